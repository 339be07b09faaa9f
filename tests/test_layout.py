"""The layout of hf_kd (issue 14): no import circle among its modules (imports inside functions included), the
library core imports nothing from the applications (hf_kd.apps, hf_kd.cli), and an import inside a function
names an optional package only.

Read from the source with `ast`, nothing imported: every `import` / `from ... import` of an hf_kd module,
at module level or inside a function, is an edge. A parent package that Python imports on the way (hf_kd/__init__
for every module) is not an edge: only what the code names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_kd"
APPS = ("hf_kd.apps", "hf_kd.cli")
# Packages that a function may import on first use: not installed by default, or only on some machines.
OPTIONAL = ("matplotlib", "deepspeed", "torch.distributed", "huggingface_hub", "trl", "gguf", "tensorboard", "optuna")
# Resolving a Hub id must stay light (tests/test_offline.py pins that it imports neither torch nor datasets):
# transformers is imported only when a GGUF stand-in is built.
LIGHT = {"hf_kd.apps.offline": ("transformers",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import in module `name` (any package)."""
    tree = ast.parse(MODULES[name].read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".") if _is_package(name) else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # `from . import teachers` names a module; `from .x import y` names x
                    target = f"{base}.{alias.name}"
                    found.append((target if target in MODULES else base, inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the hf_kd modules it imports (at module level or inside a function)."""
    return {name: {t for t, _, _ in imports(name) if t in MODULES and t != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def is_app(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPS)


def test_the_walk_sees_the_modules_and_their_imports():
    assert {"hf_kd", "hf_kd.trainer", "hf_kd.cli", "hf_kd.apps.distill", "hf_kd.apps.data"} <= set(MODULES)
    assert "hf_kd.apps.distill" in graph()["hf_kd.cli"]
    assert "hf_kd.trainer" in graph()["hf_kd.apps.distill"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_core_imports_no_application():
    bad = [f"{name} imports {target} (line {line})" for name in MODULES if not is_app(name)
           for target, _, line in imports(name) if is_app(target)]
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_are_of_optional_packages_only():
    bad = [f"{name}:{line} imports {target} inside a function" for name in MODULES
           for target, inner, line in imports(name)
           if inner
           and not any(target == o or target.startswith(o + ".") for o in OPTIONAL + LIGHT.get(name, ()))]
    assert not bad, "\n".join(bad)

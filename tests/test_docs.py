"""The Python examples of README.md and docs/*.md run, as written, on tiny models.

Each ```python block runs in a fresh working folder where `path/to/...` holds the tiny models and
tokenizers the examples load (built from configs, as in conftest.py). A block that cannot run here (a
Hub push, a GPU, `accelerate launch`) is preceded by `<!-- not-run: REASON -->`; there are few of those.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import build_tokenizer, make_bert, make_llama

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not-run: (?P<reason>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)
MAX_NOT_RUN = 3


def blocks():
    """(page, index, code, reason or None) for every ```python block, in page order."""
    found = []
    for page in PAGES:
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            found.append((page.relative_to(ROOT).as_posix(), i, m["code"], m["reason"]))
    return found


BLOCKS = blocks()
RUN = [(page, i, code) for page, i, code, reason in BLOCKS if reason is None]


def save(model, tokenizer, folder: Path):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The folders the examples name: BERT sentiment teachers (4 layers, width 16) and a narrower
    2-layer student, all with a word-level tokenizer; a tiny Llama teacher for the language-model pages."""
    root = tmp_path_factory.mktemp("docs_models")
    tok = build_tokenizer()
    teachers = {"fine-tuned-teacher": 1, "teacher-a": 3, "teacher-b": 4}
    for name, seed in teachers.items():
        save(make_bert(layers=4, hidden=16, heads=4, seed=seed), tok, root / "path/to" / name)
    save(make_bert(layers=2, hidden=8, heads=2, seed=2), tok, root / "path/to/small-student")
    lm = make_llama(layers=4, hidden=16, heads=4, vocab=64, seed=5)
    lm.config.bos_token_id, lm.config.eos_token_id = 2, 3  # [CLS], [SEP] of the word-level tokenizer
    save(lm, tok, root / "path/to/lm-teacher")
    return root


def test_examples_are_found():
    assert len(RUN) >= 6, [(p, i) for p, i, _ in RUN]
    not_run = [(page, i, reason) for page, i, _, reason in BLOCKS if reason is not None]
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert all(reason.strip() for _, _, reason in not_run)


@pytest.mark.parametrize("page,index,code", RUN, ids=[f"{p}-{i}" for p, i, _ in RUN])
def test_example_runs(page, index, code, models, tmp_path, monkeypatch):
    (tmp_path / "path").symlink_to(models / "path")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"{page}, python block {index}", "exec"), {"__name__": "__main__"})


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


LINK = re.compile(r"\]\(([^)\s]*)\)")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    titles = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def test_links_between_pages_resolve():
    index = (ROOT / "docs/README.md").read_text()
    for page in PAGES:
        for link in LINK.findall(page.read_text()):
            if link.startswith(("http://", "https://")):
                continue
            target, _, anchor = link.partition("#")
            path = page.parent / target if target else page
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(path), f"{page.name} links to {link}: no such heading"
        if page.parent.name == "docs" and page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"

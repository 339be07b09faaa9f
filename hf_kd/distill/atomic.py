"""Saves that are complete or absent: written under a temporary name, flushed to disk, then renamed.

A kill (SIGKILL, a pre-empted machine) at any moment leaves what was there before intact and, at most, an
entry named ``hf_kd-partial-...`` (or ``hf_kd-replaced-...`` during the two renames that replace an existing
folder), which `remove_partial` clears at the next start. Transformers never takes these names for
checkpoints: its resume matches ``checkpoint-N`` and its rotation globs ``checkpoint-*``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

logger = logging.getLogger(__name__)

#: A folder being written; deleted by the next start.
PARTIAL = "hf_kd-partial-"
#: An existing entry set aside while a new one takes its name; put back by the next start if the new one is missing.
REPLACED = "hf_kd-replaced-"
#: Weight files that a new save into an existing folder makes stale when it does not write them (old shards).
WEIGHT_FILE = re.compile(r"^(pytorch_model|model|adapter_model)(-\d+-of-\d+)?\.(bin|safetensors)(\.index\.json)?$")


def partial_path(final: str) -> str:
    """Where `final` is written before it is renamed: beside it, under a name no loader takes for it."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, PARTIAL + name)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk (a renamed folder must hold data)."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems (Windows): its entries are flushed with it there
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder's fsync is refused on some file systems; its files are flushed
        pass
    finally:
        os.close(fd)


def replace(src: str, dst: str) -> None:
    """Give `src` the name `dst` by renames: a file in one step; an existing folder is set aside first, deleted after."""
    if not os.path.lexists(dst) or (os.path.isfile(src) and os.path.isfile(dst)):
        os.replace(src, dst)
        return
    aside = os.path.join(os.path.dirname(dst), REPLACED + os.path.basename(dst))
    remove(aside)
    os.rename(dst, aside)
    os.rename(src, dst)
    remove(aside)


def publish_folder(staged: str, final: str) -> None:
    """Flush the complete folder `staged`, then rename it to `final` (replacing a folder of that name)."""
    fsync_tree(staged)
    replace(staged, final)
    _fsync(os.path.dirname(os.path.abspath(final)))


def publish_entries(staged: str, final: str) -> None:
    """Move the entries of the complete folder `staged` into the existing folder `final`, each by a rename: every
    name of `final` holds its old or its new content, never a part. Weight files of an earlier save that this one
    did not write (other shards) are removed, so that `final` holds one model."""
    fsync_tree(staged)
    names = sorted(os.listdir(staged))
    for name in names:
        replace(os.path.join(staged, name), os.path.join(final, name))
    for name in os.listdir(final):
        if WEIGHT_FILE.match(name) and name not in names:
            remove(os.path.join(final, name))
    os.rmdir(staged)
    _fsync(final)


def remove_partial(folder: str) -> list[str]:
    """Clear what a killed save left in `folder`: delete partial folders; put back an entry set aside for a
    replacement that never arrived (else delete it). Returns the names cleared."""
    if not os.path.isdir(folder):
        return []
    cleared = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(PARTIAL):
            remove(path)
        elif name.startswith(REPLACED):
            original = os.path.join(folder, name[len(REPLACED):])
            if os.path.lexists(original):
                remove(path)
            else:
                os.rename(path, original)
        else:
            continue
        cleared.append(name)
    if cleared:
        logger.warning("%s: removed what an interrupted save left: %s", folder, ", ".join(cleared))
    return cleared

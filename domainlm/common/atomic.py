"""Atomic outputs: write to a temporary sibling, then ``os.replace`` it into place.

A crash part-way through a stage must never leave a half-written file or folder that looks
finished; ``os.replace`` is atomic on POSIX when source and target share a filesystem, which a
sibling path guarantees. The temporary name is hidden and carries the writer's pid
(``.<name>.<pid>.<random>.tmp``); one left behind by a writer that was killed (SIGKILL, OOM, power loss)
is removed by the next :func:`atomic_path` for the same target once that pid is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it onto ``target``.

    On an exception the temporary file or folder is removed and ``target`` is left as it was.
    Parent folders of ``target`` are created.

    Args:
        target: final file (or folder, with ``is_dir=True``) path.
        is_dir: yield an empty temporary folder instead of a file path. An existing ``target``
            folder is replaced whole.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    prefix = f".{target.name}.{os.getpid()}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) paths; give the output the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if is_dir:
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder ``<parent>/.<name>.<pid>.<random>.tmp``, removed on exit; one a killed process left behind
    (same ``parent`` and ``name``, writer gone) is removed on entry (:func:`remove_stale_temporaries`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent / name)
    folder = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``target`` (``.<name>.<pid>.*.tmp`` beside it) whose writer process is gone.

    Returns:
        The paths removed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0; a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON (non-ASCII kept readable) to ``target`` atomically."""
    return write_text(target, json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=False) + "\n")

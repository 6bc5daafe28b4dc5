"""What ``dvc.yaml`` declares, read back by the stages: a stage's deps, and whether they cover the
external inputs (local files outside the pipeline, ``s3://`` objects) it is about to read.

DVC re-runs a stage only when a declared dep changes (local files by MD5, ``s3://`` objects by ETag).
A stage that reads an input its ``dvc.yaml`` entry does not list would be skipped by ``dvc repro``
when that input grows: :func:`require_declared` turns that silent staleness into a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import yaml

DVC_YAML = Path("dvc.yaml")


class UndeclaredInputError(RuntimeError):
    """A stage reads an external input that is not one of its deps in ``dvc.yaml``."""


def declared_deps(stage: str, dvc_yaml: str | os.PathLike = DVC_YAML) -> list[str]:
    """The ``deps`` of ``stage`` in ``dvc_yaml``, as written (no templating expanded).

    Raises:
        FileNotFoundError: when ``dvc_yaml`` does not exist.
        KeyError: when the file has no such stage.
    """
    with open(dvc_yaml, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    stages = doc.get("stages") or {}
    if stage not in stages:
        raise KeyError(f"{dvc_yaml} has no stage {stage!r}")
    return [str(d) for d in (stages[stage].get("deps") or [])]


def _norm(path: str, root: Path) -> str:
    if path.startswith("s3://"):
        return path.rstrip("/")
    p = Path(path)
    return os.path.normpath(str(p if p.is_absolute() else (root / p).resolve()))


def covers(dep: str, target: str, root: str | os.PathLike = ".") -> bool:
    """True when DVC dep ``dep`` covers ``target``: the same path, or a folder / ``s3://`` prefix above it."""
    root = Path(root).resolve()
    d, t = _norm(dep, root), _norm(target, root)
    if d.startswith("s3://") != t.startswith("s3://"):
        return False
    return t == d or t.startswith(d.rstrip("/") + "/")


def undeclared(inputs: Iterable[str], deps: Iterable[str], root: str | os.PathLike = ".") -> list[str]:
    """The ``inputs`` that no dep in ``deps`` covers (see :func:`covers`), in input order."""
    deps = list(deps)
    return [i for i in inputs if not any(covers(d, i, root) for d in deps)]


def require_declared(stage: str, inputs: Iterable[str], dvc_yaml: str | os.PathLike = DVC_YAML) -> None:
    """Raise unless every external input of ``stage`` is covered by one of its ``dvc.yaml`` deps.

    Skipped when ``dvc_yaml`` does not exist (a stage run as a library, outside a DVC project).

    Raises:
        UndeclaredInputError: naming each missing dep and the line to add to ``dvc.yaml``.
    """
    if not Path(dvc_yaml).exists():
        return
    missing = undeclared(inputs, declared_deps(stage, dvc_yaml), Path(dvc_yaml).parent)
    if missing:
        lines = "\n".join(f"      - {m}" for m in missing)
        raise UndeclaredInputError(
            f"stage {stage!r} reads {missing}, which {dvc_yaml} does not list as deps of {stage!r}, so "
            f"`dvc status` could not see them change. Add them under stages.{stage}.deps:\n{lines}"
        )

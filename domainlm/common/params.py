"""Read sections of ``params.yaml``, the one place a run's knobs live (DVC's params file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from domainlm.common.paths import PARAMS_FILE


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """Return the whole ``params.yaml`` as a dict.

    Raises:
        FileNotFoundError: when ``path`` does not exist (run stages from the repository root).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run stages from the repository root (where dvc.yaml is)")
    with p.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def section(name: str, path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """Return one top-level section of ``params.yaml`` (e.g. ``"dedup"``).

    Raises:
        KeyError: when the section is missing, naming it.
    """
    params = load_params(path)
    if name not in params:
        raise KeyError(f"params.yaml has no '{name}' section")
    return params[name]


def domains(path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """Return the top-level ``domains`` list: the domains the pipeline builds experts for."""
    return list(load_params(path).get("domains", []))


def required_domains(stage: str, path: str | os.PathLike = PARAMS_FILE) -> list[str]:
    """:func:`domains`, for a stage that needs at least one.

    Raises:
        SystemExit: ``<stage>: params.yaml lists no domains`` when the list is missing or empty.
    """
    names = domains(path)
    if not names:
        raise SystemExit(f"{stage}: {Path(path).name} lists no domains")
    return names

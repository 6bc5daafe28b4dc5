"""What changed since the previous commit: ``dvc metrics diff HEAD --json``, run by the ``report`` stage.

Checked (DVC 3.67): the command works from inside a running ``dvc repro``. DVC releases the repository
lock while a stage's command runs (``dvc/stage/run.py`` wraps the command in
``dvc.stage.decorators.unlocked_repo``), so a stage may call ``dvc metrics diff``; a throw-away repo
whose last stage ran it printed the expected diff, and ``tests/test_report.py`` runs the stage against
a real ``dvc metrics diff``.

The notebook reads only ``metrics/``, ``plots/`` and ``eval/``, and the diff is none of those: the stage
hands it to the notebook as a parameter (an ``injected-parameters`` cell, papermill's convention),
so the executed notebook shows exactly what it was given. Writing it to a file under ``metrics/``
or ``eval/`` instead would make the stage's own output one of its inputs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def head_commit(cwd: str | os.PathLike = ".") -> str | None:
    """The short hash of ``HEAD`` in ``cwd``, or None outside a git repository or before the first commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def dvc_metrics_diff(
    rev: str = "HEAD", cwd: str | os.PathLike = ".", exclude: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """``dvc metrics diff <rev> --json`` in ``cwd``, parsed: ``{file: {metric: {"old", "new", "diff"}}}``.

    Runs DVC with this interpreter (``python -m dvc``), so the venv's DVC answers. Only metrics that
    changed are listed (DVC's default); ``{}`` means nothing changed.

    Args:
        rev: the git revision to compare the workspace against.
        cwd: the repository root.
        exclude: metrics files to leave out (the report's own ``metrics/report.json``, which the
            running stage is about to rewrite).

    Returns:
        The parsed diff, or None when DVC cannot compare (not a DVC/git repository, no such revision):
        the report then says the comparison is missing instead of failing.
    """
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", rev, "--json"]
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("dvc metrics diff %s failed: %s", rev, exc)
        return None
    if out.returncode != 0:
        log.warning("dvc metrics diff %s exited %d: %s", rev, out.returncode, out.stderr.strip()[-500:])
        return None
    try:
        diff = json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        log.warning("dvc metrics diff %s printed no JSON: %r", rev, out.stdout[:200])
        return None
    skip = {Path(e).as_posix() for e in exclude}
    return {f: v for f, v in diff.items() if Path(f).as_posix() not in skip}

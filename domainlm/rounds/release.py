"""The LM release, the slow cadence beside the daily round: ``python -m domainlm.rounds release-lm``
(``domainlm release-lm``, ``make release-lm``).

A release freezes today's split into ``data/release`` (:func:`domainlm.documents.release.cut_release`), ``dvc add``-s
it, pushes it, commits the pointer and tags ``lm-release-N``. The next ``dvc repro`` (or round) rebuilds the LM from
it; a classifier trained on the new LM then enters as the challenger of the deployed one. Between releases no LM
stage runs: the ``lm_data`` stage gives them the same bytes whatever documents arrive.

A round cuts a release itself when none is cut yet (release 0), when ``params.yaml`` names a domain the release lacks,
or when ``release.new_fraction`` is set and the documents added since the release reach that fraction of it
(:func:`release_due`).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.documents import release as rel

log = logging.getLogger("domainlm.rounds")
TAG_PREFIX = "lm-release-"


@dataclass(frozen=True)
class ReleaseResult:
    """A cut release: its ``number``, the ``reason``, ``docs`` (total documents frozen), and the ``commit`` and
    ``tag`` (``None`` when not committed)."""

    number: int
    reason: str
    docs: int
    commit: str | None = None
    tag: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sh(cmd: list[str]) -> subprocess.CompletedProcess:
    from domainlm.rounds.daily import sh  # daily imports this module: import at call time

    return sh(cmd)


def in_pipeline(cwd: str | os.PathLike = ".") -> bool:
    """Whether the repository's ``dvc.yaml`` reads the LM release (``data/release``): the rounds of a pipeline
    without it (a pipeline of your own that only uses the round's lock, commit and tag) never cut one."""
    dvc_yaml = Path(cwd) / "dvc.yaml"
    return dvc_yaml.is_file() and str(paths.RELEASE_DIR) in dvc_yaml.read_text(encoding="utf-8")


def ensure_release(dvc: str = "dvc", cwd: str | os.PathLike = ".") -> None:
    """Make ``data/release`` exist: ``dvc pull`` it, or write release 0 (:func:`domainlm.documents.release.
    write_bootstrap`) when the remote lacks it."""
    from domainlm.rounds.daily import pull_or_bootstrap

    pull_or_bootstrap(paths.RELEASE_DIR, rel.write_bootstrap, dvc=dvc, cwd=cwd)


def new_fraction() -> float | None:
    """``release.new_fraction`` of ``params.yaml`` (``None``: a round never cuts a release for new documents)."""
    value = (P.load_params().get("release") or {}).get("new_fraction")
    return None if value is None else float(value)


def release_due() -> str | None:
    """Why a round should cut a release before ``dvc repro``, or ``None``: no release cut yet; a domain of
    ``params.yaml`` missing from the release; or :func:`new_fraction` set and the documents of today's label table
    that the release lacks at or above that fraction of it (the caller runs ``dvc repro split`` first).

    Raises:
        FileNotFoundError: no release folder, or (with the fraction rule) no label table.
    """
    manifest = rel.read_release(paths.RELEASE_DIR)
    if manifest["release"] == 0:
        return "no LM release cut yet"
    absent = [d for d in P.domains() if d not in manifest["domains"]]
    if absent:
        return f"domain(s) {absent} are not in LM release {manifest['release']}"
    fraction = new_fraction()
    if fraction is None:
        return None
    counts = rel.new_documents(paths.RELEASE_DIR, paths.LABELS_PATH)
    share = counts["new_docs"] / max(counts["release_docs"], 1)
    if share >= fraction:
        return (
            f"{counts['new_docs']} documents arrived since LM release {manifest['release']} "
            f"({share:.1%} of its {counts['release_docs']}; release.new_fraction {fraction:.1%})"
        )
    return None


def release_lm(*, reason: str = "requested", dvc: str = "dvc", commit: bool = True, push: bool = True) -> ReleaseResult:
    """Cut the next LM release from today's split: ``dvc repro split``, copy it into ``data/release``, ``dvc add``,
    ``dvc push`` (``push``), then commit ``data/release.dvc`` and tag ``lm-release-N`` (``commit``).

    The data goes to the remote before the commit that names it. Other changes in the working tree (``dvc.lock`` after
    ``dvc repro split``) are left for the next round's commit.

    Raises:
        RuntimeError: a ``dvc`` or ``git`` command failed, or the tag exists already.
    """
    ensure_release(dvc)
    _sh([dvc, "repro", "-q", "split"])
    number = int(rel.read_release(paths.RELEASE_DIR)["release"]) + 1
    tag = f"{TAG_PREFIX}{number}"
    if commit and _sh(["git", "tag", "--list", tag]).stdout.strip():
        raise RuntimeError(f"tag {tag} exists already; {paths.RELEASE_MANIFEST} says release {number - 1}")
    manifest = rel.cut_release(paths.SPLIT_DIR, paths.LABELS_PATH, paths.RELEASE_DIR, P.domains(), number)
    _sh([dvc, "add", "-q", str(paths.RELEASE_DIR)])
    if push:
        _sh([dvc, "push", "-q", f"{paths.RELEASE_DIR}.dvc"])
    log.info("cut LM release %d: %d documents (%s)", number, manifest["total"], reason)
    if not commit:
        return ReleaseResult(number, reason, manifest["total"])
    pointer = [f"{paths.RELEASE_DIR}.dvc", str(paths.RELEASE_DIR.parent / ".gitignore")]
    pointer = [p for p in pointer if Path(p).exists()]
    message = f"{tag}: {manifest['total']} documents frozen for the LM ({reason})"
    _sh(["git", "add", "--", *pointer])
    _sh(["git", "commit", "-q", "-m", message, "--", *pointer])
    sha = _sh(["git", "rev-parse", "HEAD"]).stdout.strip()
    _sh(["git", "tag", "-a", tag, "-m", message])
    log.info("committed %s and tagged it %s", sha[:10], tag)
    return ReleaseResult(number, reason, manifest["total"], sha, tag)

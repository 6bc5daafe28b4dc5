"""The LM release: the frozen split the LM stages train and evaluate on, so that a day's new documents reach the
classifier without rebuilding the LM.

``data/release/`` is a ``dvc add``-ed folder (an input, never a stage output, so ``dvc status`` stays truthful: the
LM is exactly as old as its release), replaced only by ``domainlm release-lm``. It holds ``release.json``
(:func:`read_release`) and, once a release is cut, a byte copy of that day's split:
``<domain>/{train,val,test}.parquet`` and ``split_labels.parquet``. Release 0 (:data:`BOOTSTRAP_BYTES`, a fresh
clone's bootstrap) holds no documents: the LM follows the current split until the first release is cut.

Two readers: the ``lm_data`` stage (:func:`lm_documents`) gives the LM stages the release's documents, and the
``split`` stage keeps every released document in its released split (a document's split is assigned once). This
is the pinned-backbone design of production loops with two cadences (TFX's warm-started Trainer beside a rarely
bumped base model; DVC's pinned imports bumped with ``dvc update``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from domainlm.common.atomic import atomic_path
from domainlm.common.paths import SPLITS, split_path

MANIFEST = "release.json"
LABELS_FILE = "split_labels.parquet"
#: Release 0's manifest, byte for byte: no documents frozen yet.
BOOTSTRAP_BYTES = b'{"release": 0}\n'


class ReleaseError(ValueError):
    """The release folder is malformed, or lacks a domain the LM stages need."""


def write_bootstrap(release_dir: str | os.PathLike) -> Path:
    """Create ``release_dir`` holding only ``release.json`` = :data:`BOOTSTRAP_BYTES` (release 0), atomically.

    Raises:
        FileExistsError: ``release_dir`` already exists (a release is never overwritten by the bootstrap).
    """
    release_dir = Path(release_dir)
    if release_dir.exists():
        raise FileExistsError(f"{release_dir} exists; the bootstrap only creates a missing folder")
    with atomic_path(release_dir, is_dir=True) as tmp:
        (tmp / MANIFEST).write_bytes(BOOTSTRAP_BYTES)
    return release_dir


def read_release(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The release manifest: ``release`` (int, 0 = none cut yet) and, for a cut release, ``domains`` (list) and
    ``docs`` (``{domain: {split: documents}}``) and ``total`` (documents).

    Raises:
        FileNotFoundError: no ``release.json`` (``dvc pull data/release.dvc`` or ``domainlm release-lm --bootstrap``).
        ReleaseError: not a JSON object with an integer ``release`` >= 0, or a cut release misses a file.
    """
    path = Path(release_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: `dvc pull {Path(release_dir)}.dvc`, or `domainlm release-lm --bootstrap` on a "
            "fresh clone"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("release"), int) or manifest["release"] < 0:
        raise ReleaseError(f"{path}: expected {{'release': <int >= 0>, ...}}, got {manifest!r}")
    if manifest["release"] > 0:
        missing = [str(split_path(release_dir, d, s)) for d in manifest.get("domains", []) for s in SPLITS] + [
            str(Path(release_dir) / LABELS_FILE)
        ]
        missing = [p for p in missing if not Path(p).is_file()]
        if missing:
            raise ReleaseError(f"{path}: release {manifest['release']} lacks {missing}")
    return manifest


def cut_release(
    split_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    release_dir: str | os.PathLike,
    domains: Sequence[str],
    number: int,
) -> dict[str, Any]:
    """Freeze the current split as release ``number``: copy every domain's split files and the label table into
    ``release_dir`` (replaced atomically) and write ``release.json``.

    The folder's bytes depend only on the split files, the label table, ``domains`` and ``number`` (no date, no
    commit), so cutting the same release from the same split anywhere gives the same ``data/release.dvc``.

    Returns:
        The manifest written (:func:`read_release`).

    Raises:
        FileNotFoundError: a split file or the label table is missing.
        ValueError: ``number`` < 1 or ``domains`` empty.
    """
    if number < 1:
        raise ValueError(f"a cut release is numbered from 1, got {number}")
    if not domains:
        raise ValueError("no domains to release")
    files = {(d, s): split_path(split_dir, d, s) for d in domains for s in SPLITS}
    missing = [str(p) for p in [*files.values(), Path(labels_path)] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot cut release {number}: missing {missing} (run `dvc repro split`)")
    docs = {d: {s: pq.ParquetFile(files[d, s]).metadata.num_rows for s in SPLITS} for d in domains}
    manifest = {
        "release": int(number),
        "domains": list(domains),
        "docs": docs,
        "total": sum(n for per in docs.values() for n in per.values()),
    }
    with atomic_path(release_dir, is_dir=True) as tmp:
        for (d, s), src in files.items():
            dst = split_path(tmp, d, s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        shutil.copyfile(labels_path, Path(tmp) / LABELS_FILE)
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def lm_documents(
    release_dir: str | os.PathLike, split_dir: str | os.PathLike, out_dir: str | os.PathLike, domains: Sequence[str]
) -> dict[str, Any]:
    """Write the LM stages' documents to ``out_dir/<domain>/{train,val,test}.parquet`` (replaced atomically): the
    release's files, byte for byte, or the current split's while no release is cut (release 0).

    After a release, the output is the same bytes whatever documents arrive, so ``dvc repro`` skips every LM
    stage until the next release.

    Returns:
        ``{"release": int, "source": "release" | "split", "docs": {domain: {split: documents}}, "total": int}``.

    Raises:
        ReleaseError: a domain of ``domains`` is not in the release (a new domain needs a new release:
            ``domainlm release-lm``); see also :func:`read_release`.
        FileNotFoundError: a source file is missing.
    """
    manifest = read_release(release_dir)
    number = int(manifest["release"])
    if number > 0:
        absent = [d for d in domains if d not in manifest["domains"]]
        if absent:
            raise ReleaseError(
                f"domain(s) {absent} are not in LM release {number} (it has {manifest['domains']}): cut a release "
                "with `domainlm release-lm`"
            )
    source_dir = Path(release_dir) if number > 0 else Path(split_dir)
    docs: dict[str, dict[str, int]] = {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        for d in domains:
            docs[d] = {}
            for s in SPLITS:
                src, dst = split_path(source_dir, d, s), split_path(tmp, d, s)
                if not src.is_file():
                    raise FileNotFoundError(f"{src} is missing")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                docs[d][s] = pq.ParquetFile(dst).metadata.num_rows
    return {
        "release": number,
        "source": "release" if number > 0 else "split",
        "docs": docs,
        "total": sum(n for per in docs.values() for n in per.values()),
    }


def new_documents(release_dir: str | os.PathLike, labels_path: str | os.PathLike) -> dict[str, int]:
    """How far the current split has moved from the release, by id: ``{"release_docs", "current_docs",
    "new_docs"}`` (``new_docs``: ids of the label table ``labels_path`` that the release does not hold). Reads the
    ``id`` columns only.

    Raises:
        FileNotFoundError: ``labels_path`` is missing. ReleaseError: see :func:`read_release`.
    """
    import pyarrow.compute as pc

    manifest = read_release(release_dir)
    current = pq.read_table(labels_path, columns=["id"])["id"]
    if int(manifest["release"]) == 0:
        return {"release_docs": 0, "current_docs": len(current), "new_docs": len(current)}
    released = pq.read_table(Path(release_dir) / LABELS_FILE, columns=["id"])["id"]
    new = int(pc.sum(pc.invert(pc.is_in(current, value_set=released))).as_py() or 0)
    return {"release_docs": len(released), "current_docs": len(current), "new_docs": new}

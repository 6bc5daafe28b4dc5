"""validate: stream JSONL (local or ``s3://``) line by line and account for every line, kept or rejected with a reason.

Kept records are NFC-normalized (Unicode TR15); see :mod:`domainlm.documents.validation` (datatrove-style
per-step stats: kept + rejected = lines read, per file).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import atomic_path
from domainlm.common.pipeline import UndeclaredInputError, require_declared
from domainlm.common.stage import fail, parse_stage_args, stage_run
from domainlm.documents.jsonl import input_root
from domainlm.documents.validation import Validator, validate_files


def run(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    domains: Sequence[str] | None,
    min_chars: int = 30,
    max_chars: int = 200_000,
    preview_per_domain: int = 5,
) -> dict[str, Any]:
    """Validate every line of ``inputs`` into ``out_dir``, replacing that folder as a whole, atomically.

    Args:
        inputs: local globs/paths or ``s3://`` patterns of JSONL files.
        out_dir: output folder: ``<domain>.jsonl``, ``rejects.jsonl``, ``sample_preview.json``.
        domains: allowed domain names (each gets a file, even if empty); empty or ``None`` allows any
            safe file name.
        min_chars, max_chars: allowed text length in code points after NFC, inclusive.
        preview_per_domain: records per domain in ``sample_preview.json``.

    Returns:
        The metrics dict of :func:`domainlm.documents.validation.validate_files`.

    Raises:
        FileNotFoundError: when an input pattern matches nothing (``out_dir`` is then left as it was).
    """
    validator = Validator(min_chars=int(min_chars), max_chars=int(max_chars), domains=set(domains) if domains else None)
    with atomic_path(out_dir, is_dir=True) as tmp:
        return validate_files(list(inputs), tmp, validator, int(preview_per_domain))


def main(argv: Sequence[str] = ()) -> None:
    """DVC entry point: params ``domains`` + ``validate`` -> data/validated/, metrics/validate.json."""
    parse_stage_args("validate", __doc__, argv)
    with stage_run("validate") as st:
        cfg = P.section("validate")
        inputs = list(cfg.get("inputs") or [str(paths.RAW_DIR / "*.jsonl")])
        try:
            require_declared("validate", [input_root(i) for i in inputs])
        except UndeclaredInputError as exc:
            fail(f"validate: {exc}")
        metrics = run(
            inputs,
            paths.VALIDATED_DIR,
            domains=P.required_domains("validate"),
            min_chars=cfg.get("min_chars", 30),
            max_chars=cfg.get("max_chars", 200_000),
            preview_per_domain=cfg.get("preview_per_domain", 5),
        )
        st.write_metrics("validate", metrics)
        t = metrics["totals"]
        st.log.info(
            "%d lines read: %d kept, %d rejected %s",
            t["lines_read"],
            t["kept"],
            t["rejected"],
            {k: v for k, v in metrics["by_reason"].items() if v},
        )


if __name__ == "__main__":
    main(sys.argv[1:])

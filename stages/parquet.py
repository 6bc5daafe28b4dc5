"""parquet: convert each domain's deduplicated JSONL into one Parquet file with an explicit Arrow schema.

Streams record batches with pyarrow's JSON reader and writes them with ``ParquetWriter.write_batch``,
brotli for ``text`` and zstd for the other columns (Apache Arrow / Apache Parquet); see
:mod:`domainlm.documents.conversion` and the table contract in :mod:`domainlm.documents.schema`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import atomic_path, write_text
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.documents.conversion import convert_domain
from domainlm.documents.schema import SCHEMA_FILE, ParquetLayout, schema_text

log = logging.getLogger("stages.parquet")  # the logger stage_run("parquet") configures


def run(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    domains: Sequence[str],
    *,
    text_codec: str,
    default_codec: str,
    batch_rows: int,
) -> dict[str, Any]:
    """Convert ``<in_dir>/<domain>.jsonl`` for every domain into ``<out_dir>/<domain>.parquet`` plus ``schema.txt``.

    Only the listed domains are read (the dedup folder also holds e.g. ``removed.jsonl``).
    ``out_dir`` is replaced as a whole, atomically.

    Args:
        in_dir, out_dir: the dedup stage's folder and the folder to write.
        domains: domain names, in the order to convert them.
        text_codec: Parquet codec of the ``text`` column (e.g. ``"brotli"``).
        default_codec: Parquet codec of every other column (e.g. ``"zstd"``).
        batch_rows: rows per Parquet row group.

    Returns:
        The metrics dict: ``{"domains": {d: {rows, chars, row_groups, jsonl_bytes, parquet_bytes,
        compression_ratio}}, "total": {...same...}, "wall_s", "docs_per_s", "peak_rss_mb"}``;
        ``compression_ratio`` = JSONL bytes / Parquet bytes (2.0 means half the size).

    Raises:
        ValueError: for an unknown codec, a non-positive ``batch_rows`` or an empty ``domains``.
        FileNotFoundError: naming the domains whose ``<in_dir>/<domain>.jsonl`` is missing.
        domainlm.documents.schema.BadDocumentError: for a record breaking the data contract.
    """
    t0 = time.perf_counter()
    layout = ParquetLayout.from_params(text_codec, default_codec, batch_rows)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not domains:
        raise ValueError("params.yaml `domains` is empty: nothing to convert")
    missing = [d for d in domains if not (in_dir / f"{d}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(
            f"domain(s) {missing} listed in params.yaml have no {in_dir}/<domain>.jsonl (run the dedup stage first)"
        )
    per_domain: dict[str, dict] = {}
    with atomic_path(out_dir, is_dir=True) as tmp_dir:
        write_text(tmp_dir / SCHEMA_FILE, schema_text())
        for domain in domains:
            stats = convert_domain(in_dir / f"{domain}.jsonl", tmp_dir / f"{domain}.parquet", domain, layout)
            stats["compression_ratio"] = _ratio(stats["jsonl_bytes"], stats["parquet_bytes"])
            per_domain[domain] = stats
            log.info(
                "parquet %s: %d rows, %d -> %d bytes",
                domain,
                stats["rows"],
                stats["jsonl_bytes"],
                stats["parquet_bytes"],
            )
    keys = ("rows", "chars", "row_groups", "jsonl_bytes", "parquet_bytes")
    total = {k: sum(s[k] for s in per_domain.values()) for k in keys}
    total["compression_ratio"] = _ratio(total["jsonl_bytes"], total["parquet_bytes"])
    wall = time.perf_counter() - t0
    return {
        "domains": per_domain,
        "total": total,
        "wall_s": round(wall, 3),
        "docs_per_s": round(total["rows"] / wall, 1) if wall > 0 else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def main(argv: Sequence[str] = ()) -> None:
    """DVC entry point: params ``domains`` + ``parquet`` -> data/parquet/, metrics/parquet.json."""
    parse_stage_args("parquet", __doc__, argv)
    with stage_run("parquet") as st:
        cfg = P.section("parquet")
        metrics = run(
            paths.DEDUP_DIR,
            paths.PARQUET_DIR,
            P.required_domains("parquet"),
            text_codec=cfg["text_codec"],
            default_codec=cfg["default_codec"],
            batch_rows=cfg["batch_rows"],
        )
        st.write_metrics("parquet", metrics)
        st.log.info(
            "parquet: %d documents in %d domains, %d -> %d bytes (%.2fx)",
            metrics["total"]["rows"],
            len(metrics["domains"]),
            metrics["total"]["jsonl_bytes"],
            metrics["total"]["parquet_bytes"],
            metrics["total"]["compression_ratio"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])

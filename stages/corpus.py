"""corpus: write ``data/raw/<domain>.jsonl`` from real Korean text that packages ship, or from your own JSONL.

Built-in sources read konlpy's kolaw/kobill corpora (PyPI) and Debian's libreoffice-help-ko and
debian-faq-ko (:mod:`domainlm.documents.sources`); ``type: jsonl`` sources stream local globs or
``s3://`` URIs through smart_open. A domain may list several sources: their records are concatenated in order,
a later record of an id replacing the earlier one. ``data/raw/MANIFEST.json`` records package versions and counts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import atomic_path
from domainlm.common.pipeline import UndeclaredInputError, require_declared
from domainlm.common.stage import fail, parse_stage_args, stage_run
from domainlm.documents import sources
from domainlm.documents.corpus import build_corpus, external_inputs


def run(
    source_specs: dict[str, dict],
    domains: list[str],
    out_dir: str | Path,
    cache_dir: str | Path,
    max_docs_per_domain: int | None = None,
) -> dict[str, Any]:
    """Build ``out_dir`` (replaced whole, atomically) and return its manifest.

    Raises:
        ValueError: when ``domains`` and ``source_specs`` disagree.
        sources.SourceUnavailable: when a source cannot be had (never skipped quietly).
    """
    with atomic_path(out_dir, is_dir=True) as tmp:
        return build_corpus(source_specs, domains, tmp, Path(cache_dir).expanduser(), max_docs_per_domain)


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("corpus", __doc__, argv)
    with stage_run("corpus") as st:
        cfg = P.section("corpus")
        specs = cfg.get("sources") or {}
        try:
            require_declared("corpus", external_inputs(specs))
            manifest = run(
                specs,
                P.required_domains("corpus"),
                paths.RAW_DIR,
                cfg.get("cache_dir") or ".cache/corpus",
                cfg.get("max_docs_per_domain"),
            )
        except (sources.SourceUnavailable, UndeclaredInputError, ValueError) as exc:
            fail(f"corpus: {exc}")
        for domain, entry in manifest["domains"].items():
            if "sources" in entry:
                st.log.info(
                    "%s: %s lines from %d sources (%s read, %s updated, %s repeated)",
                    domain,
                    entry["lines"],
                    len(entry["sources"]),
                    entry["lines_read"],
                    entry["updated"],
                    entry["repeated"],
                )
                continue
            st.log.info(
                "%s: %s documents (%s %s)",
                domain,
                entry.get("documents", entry.get("lines")),
                entry.get("package", entry.get("uri")),
                entry.get("version", ""),
            )
        st.write_metrics("corpus", corpus_metrics(manifest))


def corpus_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """``metrics/corpus.json``: documents (built-in sources) or lines (JSONL sources, lists) per domain, chars,
    and the lines a later record of the same id replaced: ``updated`` (changed) and ``repeated`` (identical);
    both are 0 for a domain with one source."""
    domains = {
        d: {
            "documents": e.get("documents", e.get("lines", 0)),
            "chars": e.get("chars", 0),
            "updated": e.get("updated", 0),
            "repeated": e.get("repeated", 0),
        }
        for d, e in manifest["domains"].items()
    }
    totals = dict(manifest["totals"])
    for key in ("updated", "repeated"):
        totals[key] = sum(m[key] for m in domains.values())
    return {"domains": domains, "totals": totals}


if __name__ == "__main__":
    main(sys.argv[1:])

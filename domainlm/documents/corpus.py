"""Corpus building: real Korean documents from packages (:mod:`domainlm.documents.sources`) or a user's
JSONL (local globs or ``s3://`` URIs through smart_open), one ``<domain>.jsonl`` per domain.

It also says which external inputs a source reads (:func:`external_inputs`), so the ``corpus`` stage can
insist that ``dvc.yaml`` lists them as deps: otherwise ``dvc status`` could not see new data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from domainlm.documents import sources
from domainlm.documents.jsonl import dumps, expand_uris, input_root, iter_raw_lines

log = logging.getLogger(__name__)

BUILTIN = {
    "kolaw": (sources.fetch_wheel, sources.kolaw_documents),
    "kobill": (sources.fetch_wheel, sources.kobill_documents),
    "libreoffice_help": (sources.fetch_deb, sources.libreoffice_help_documents),
    "debian_faq": (sources.fetch_deb, sources.debian_faq_documents),
}
# The package each built-in type reads when params name none.
DEFAULT_PACKAGE = {
    "kolaw": sources.KONLPY_REQUIREMENT,
    "kobill": sources.KONLPY_REQUIREMENT,
    "libreoffice_help": "libreoffice-help-ko",
    "debian_faq": "debian-faq-ko",
}


def evenly_spaced(items: list, limit: int | None) -> list:
    """At most ``limit`` items picked at even strides (deterministic, keeps the label mix of a sorted list)."""
    if limit is None or len(items) <= limit:
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def map_jsonl_line(line: bytes, domain: str, fields: dict[str, str], origin: str) -> bytes:
    """Rename a user JSONL line's fields to ours (``fields`` maps our name -> theirs) and fill ``domain``/``source``.

    A line that is not a JSON object is passed through unchanged, so ``validate`` rejects it with its
    reason and line number rather than losing it here.
    """
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return line
    if not isinstance(obj, dict):
        return line
    for ours, theirs in fields.items():
        if theirs != ours and theirs in obj:
            obj[ours] = obj.pop(theirs)
    obj.setdefault("domain", domain)
    obj.setdefault("source", origin)
    return dumps(obj).encode("utf-8")


def jsonl_source_lines(domain: str, spec: dict[str, Any]) -> Iterator[bytes]:
    """Yield the mapped lines of a ``type: jsonl`` source (``uri`` may be a glob or an ``s3://`` glob).

    Raises:
        sources.SourceUnavailable: when ``uri`` is missing or matches nothing.
    """
    uri = spec.get("uri")
    if not uri:
        raise sources.SourceUnavailable(f"corpus source '{domain}' (type jsonl) needs a 'uri' (local glob or s3://…)")
    try:
        uris = expand_uris(uri)
    except FileNotFoundError as exc:
        raise sources.SourceUnavailable(f"corpus source '{domain}': {exc}") from exc
    fields = dict(spec.get("fields") or {})
    for u in uris:
        for line in iter_raw_lines(u):
            yield map_jsonl_line(line, domain, fields, u)


def builtin_documents(domain: str, spec: dict[str, Any], cache_dir: Path) -> tuple[list[sources.Document], dict]:
    """Fetch a built-in source and return its documents and its manifest entry.

    Raises:
        sources.SourceUnavailable: unknown type, or the package cannot be had.
    """
    kind = spec.get("type")
    if kind not in BUILTIN:
        raise sources.SourceUnavailable(
            f"corpus source '{domain}' has unknown type {kind!r}; choose one of {sorted(BUILTIN) + ['jsonl']}"
        )
    fetch, read = BUILTIN[kind]
    package = spec.get("package") or DEFAULT_PACKAGE[kind]
    pkg = fetch(package, cache_dir, domain)
    docs = list(read(pkg, domain))
    return docs, {"type": kind, "package": pkg.name, "version": pkg.version}


def build_corpus(
    source_specs: dict[str, dict],
    domains: list[str],
    out_dir: Path,
    cache_dir: Path,
    max_docs_per_domain: int | None = None,
) -> dict[str, Any]:
    """Write ``<out_dir>/<domain>.jsonl`` for every domain and return the manifest.

    ``max_docs_per_domain`` (or a source's own ``max_docs``) takes a deterministic slice.

    Raises:
        ValueError: when ``domains`` and ``source_specs`` disagree.
        sources.SourceUnavailable: when a source cannot be had (never skipped quietly).
    """
    missing = [d for d in domains if d not in source_specs]
    extra = [d for d in source_specs if d not in domains]
    if missing or extra:
        raise ValueError(
            "params.yaml: every domain needs exactly one corpus source. "
            + (f"No source for {missing} (add it under corpus.sources). " if missing else "")
            + (f"Sources {extra} are not in domains (add them to domains or remove them)." if extra else "")
        )
    manifest: dict[str, Any] = {"domains": {}, "max_docs_per_domain": max_docs_per_domain}
    for domain in tqdm(domains, desc="corpus", unit="domain"):
        spec = source_specs[domain] or {}
        target = out_dir / f"{domain}.jsonl"
        limit = spec.get("max_docs", max_docs_per_domain)  # a source's own slice wins over the global one
        if spec.get("type") == "jsonl":
            lines = jsonl_source_lines(domain, spec)
            n = 0
            with target.open("wb") as fh:
                for line in lines:
                    if limit is not None and n >= limit:
                        break
                    fh.write(line + b"\n")
                    n += 1
            manifest["domains"][domain] = {"type": "jsonl", "uri": spec["uri"], "lines": n}
            continue
        docs, entry = builtin_documents(domain, spec, cache_dir)
        picked = evenly_spaced(docs, limit)
        with target.open("w", encoding="utf-8") as fh:
            for doc in picked:
                fh.write(dumps(doc.record()) + "\n")
        entry.update(
            {"documents": len(picked), "documents_available": len(docs), "chars": sum(len(d.text) for d in picked)}
        )
        labels: dict[str, int] = {}
        for d in picked:
            labels[d.label or ""] = labels.get(d.label or "", 0) + 1
        entry["documents_per_label"] = dict(sorted(labels.items()))
        manifest["domains"][domain] = entry
    manifest["totals"] = {
        "documents": sum(e.get("documents", e.get("lines", 0)) for e in manifest["domains"].values()),
        "chars": sum(e.get("chars", 0) for e in manifest["domains"].values()),
    }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


def external_inputs(source_specs: dict[str, dict]) -> list[str]:
    """What the ``type: jsonl`` sources read, as DVC dep paths (:func:`input_root` of each ``uri``).

    Built-in sources read packages pinned in ``params.yaml`` (``package``), which DVC tracks as params.
    """
    found = []
    for _domain, spec in sorted(source_specs.items()):
        spec = spec or {}
        if spec.get("type") == "jsonl" and spec.get("uri"):
            root = input_root(spec["uri"])
            if root not in found:
                found.append(root)
    return found

"""Corpus building: real Korean documents from packages (:mod:`domainlm.documents.sources`) or a user's
JSONL (local globs or ``s3://`` URIs through smart_open), one ``<domain>.jsonl`` per domain.

A domain reads one source, or a list of them in order (a package plus daily JSONL drops, say); in a list, a
later record of an id replaces the earlier one, last write wins as in an upsert, and the replacements are
counted (:func:`write_sources`).

It also says which external inputs a source reads (:func:`external_inputs`), so the ``corpus`` stage can
insist that ``dvc.yaml`` lists them as deps: otherwise ``dvc status`` could not see new data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
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


def _map_record(line: bytes, domain: str, fields: dict[str, str], origin: str) -> tuple[bytes, dict | None]:
    """:func:`map_jsonl_line` and the JSON object it wrote (None for a line passed through unchanged)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return line, None
    if not isinstance(obj, dict):
        return line, None
    for ours, theirs in fields.items():
        if theirs != ours and theirs in obj:
            obj[ours] = obj.pop(theirs)
    obj.setdefault("domain", domain)
    obj.setdefault("source", origin)
    return dumps(obj).encode("utf-8"), obj


def map_jsonl_line(line: bytes, domain: str, fields: dict[str, str], origin: str) -> bytes:
    """Rename a user JSONL line's fields to ours (``fields`` maps our name -> theirs) and fill ``domain``/``source``.

    A line that is not a JSON object is passed through unchanged, so ``validate`` rejects it with its
    reason and line number rather than losing it here.
    """
    return _map_record(line, domain, fields, origin)[0]


def _jsonl_records(domain: str, spec: dict[str, Any]) -> Iterator[tuple[bytes, dict | None]]:
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
            yield _map_record(line, domain, fields, u)


def jsonl_source_lines(domain: str, spec: dict[str, Any]) -> Iterator[bytes]:
    """Yield the mapped lines of a ``type: jsonl`` source (``uri`` may be a glob or an ``s3://`` glob).

    Raises:
        sources.SourceUnavailable: when ``uri`` is missing or matches nothing.
    """
    for line, _obj in _jsonl_records(domain, spec):
        yield line


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


def source_list(domain: str, spec: Any) -> list[dict[str, Any]]:
    """The sources of one ``corpus.sources`` entry, in order: a mapping is one source, a list several.

    Raises:
        ValueError: ``spec`` is an empty list, a list with an entry that is not a mapping, or neither a
            mapping nor a list; the message names the domain.
    """
    if spec is None or isinstance(spec, Mapping):
        return [dict(spec or {})]
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError(
                f"params.yaml: corpus.sources.{domain} is an empty list; give it at least one source, "
                f'e.g. [{{type: jsonl, uri: "incoming/{domain}/*.jsonl"}}]'
            )
        for i, entry in enumerate(spec):
            if not isinstance(entry, Mapping):
                raise ValueError(
                    f"params.yaml: corpus.sources.{domain}[{i}] is a {type(entry).__name__} ({entry!r:.60}), "
                    "not a mapping; each entry of the list is one source, such as {type: kolaw} or "
                    "{type: jsonl, uri: ...}"
                )
        return [dict(entry) for entry in spec]
    raise ValueError(
        f"params.yaml: corpus.sources.{domain} is a {type(spec).__name__} ({spec!r:.60}); give one source "
        "(a mapping such as {type: jsonl, uri: ...}) or a list of them"
    )


def source_records(
    domain: str, spec: dict[str, Any], cache_dir: Path, limit: int | None
) -> tuple[Iterator[tuple[bytes, dict | None]], dict[str, Any]]:
    """One source's output lines (bytes, no newline) with the JSON object of each (None for a line that is
    not a JSON object), and its manifest entry.

    ``limit`` keeps the first lines of a ``type: jsonl`` source and an evenly spaced slice of a built-in one.
    A built-in source is fetched here; a JSONL source is read as the iterator is consumed, and its entry's
    ``lines`` counts what was yielded.

    Raises:
        sources.SourceUnavailable: unknown type, a package that cannot be had, or a ``uri`` that is missing
            or matches nothing (the last two when the iterator is first consumed).
    """
    if spec.get("type") == "jsonl":
        entry: dict[str, Any] = {"type": "jsonl", "uri": spec.get("uri"), "lines": 0}

        def lines() -> Iterator[tuple[bytes, dict | None]]:
            for line, obj in _jsonl_records(domain, spec):
                if limit is not None and entry["lines"] >= limit:
                    break
                yield line, obj
                entry["lines"] += 1

        return lines(), entry
    docs, entry = builtin_documents(domain, spec, cache_dir)
    picked = evenly_spaced(docs, limit)
    entry.update(
        {"documents": len(picked), "documents_available": len(docs), "chars": sum(len(d.text) for d in picked)}
    )
    labels: dict[str, int] = {}
    for d in picked:
        labels[d.label or ""] = labels.get(d.label or "", 0) + 1
    entry["documents_per_label"] = dict(sorted(labels.items()))
    records = (d.record() for d in picked)
    return ((dumps(rec).encode("utf-8"), rec) for rec in records), entry


def record_id(obj: dict | None) -> str | None:
    """The id a record is known by (integers as strings, as ``validate`` keeps them), or None when it has no
    usable one (not an object, no ``id``, or an id of another type: ``validate`` rejects those)."""
    if not isinstance(obj, dict):
        return None
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        return None
    return str(rid)


def content_digest(obj: dict) -> bytes:
    """128-bit BLAKE2b of a record's fields other than ``source`` (where it was read), keys sorted and the id
    as :func:`record_id` gives it (``7`` and ``"7"`` are the same record, as after ``validate``)."""
    body = {k: v for k, v in obj.items() if k != "source"}
    if "id" in body:
        body["id"] = record_id(obj)
    text = json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def write_sources(
    domain: str,
    specs: list[dict[str, Any]],
    target: Path,
    cache_dir: Path,
    max_docs_per_domain: int | None = None,
    examples: int = 5,
) -> dict[str, Any]:
    """Write the records of several sources, in list order, to ``target``, the latest record of each id only,
    and return the domain's manifest entry.

    A record whose id occurs again later (in a later source or later in the same one) is replaced: the
    output keeps the later record at its own, later position (last write wins, as in an upsert). Each
    replaced line is counted as ``repeated`` when the record that replaces it is identical in every field but
    ``source``, and as ``updated`` otherwise (text, label or another field changed), so ``lines_read`` =
    ``lines`` + ``updated`` + ``repeated``. Lines that are not JSON objects or have no usable id are written
    as they are, for ``validate`` to reject with a reason.

    Two passes bounded by the number of ids, not by text: the first spools every line to a file beside
    ``target`` and keeps, per id, the line number, content digest and text length of its latest record; the
    second copies the spool without the replaced lines (a rename when none was replaced). Each source takes
    its own ``max_docs`` or else ``max_docs_per_domain``.

    Returns:
        ``{"sources": [entry per source], "lines_read", "lines", "chars", "updated", "repeated",
        "examples": {"updated": [id, ...], "repeated": [id, ...]}}``; ``chars`` counts the text characters
        of the lines written.

    Raises:
        sources.SourceUnavailable: when a source cannot be had (never skipped quietly).
    """
    spool = target.with_name(f".{target.name}.spool")
    latest: dict[str, tuple[int, bytes, int]] = {}  # id -> (line number, content digest, text chars)
    replaced: set[int] = set()  # line numbers of records a later one replaces
    counts = {"updated": 0, "repeated": 0}
    example_ids: dict[str, list[str]] = {"updated": [], "repeated": []}
    entries: list[dict[str, Any]] = []
    read = chars = 0
    try:
        with spool.open("wb") as fh:
            for spec in specs:
                records, entry = source_records(domain, spec, cache_dir, spec.get("max_docs", max_docs_per_domain))
                for line, obj in records:
                    fh.write(line + b"\n")
                    n_chars = len(obj["text"]) if obj is not None and isinstance(obj.get("text"), str) else 0
                    chars += n_chars
                    rid = record_id(obj)
                    if rid is not None:
                        digest = content_digest(obj)
                        prev = latest.get(rid)
                        if prev is not None:
                            kind = "repeated" if prev[1] == digest else "updated"
                            counts[kind] += 1
                            if len(example_ids[kind]) < examples and rid not in example_ids[kind]:
                                example_ids[kind].append(rid)
                            replaced.add(prev[0])
                            chars -= prev[2]
                        latest[rid] = (read, digest, n_chars)
                    read += 1
                entries.append(entry)
        del latest
        if replaced:
            log.info(
                "corpus '%s': %d of %d lines replaced by a later record of the same id: "
                "%d updated (e.g. %s), %d repeated unchanged (e.g. %s)",
                domain,
                len(replaced),
                read,
                counts["updated"],
                example_ids["updated"],
                counts["repeated"],
                example_ids["repeated"],
            )
            with spool.open("rb") as src, target.open("wb") as out:
                for i, line in enumerate(src):
                    if i not in replaced:
                        out.write(line)
        else:
            os.replace(spool, target)
    finally:
        spool.unlink(missing_ok=True)
    return {
        "sources": entries,
        "lines_read": read,
        "lines": read - len(replaced),
        "chars": chars,
        **counts,
        "examples": example_ids,
    }


def write_source(
    domain: str, spec: dict[str, Any], target: Path, cache_dir: Path, max_docs_per_domain: int | None = None
) -> dict[str, Any]:
    """Write one source's records to ``target`` as they come (repeated ids included: ``validate`` keeps the
    first) and return its manifest entry; its own ``max_docs`` wins over ``max_docs_per_domain``.

    Raises:
        sources.SourceUnavailable: when the source cannot be had (never skipped quietly).
    """
    records, entry = source_records(domain, spec, cache_dir, spec.get("max_docs", max_docs_per_domain))
    with target.open("wb") as fh:
        for line, _obj in records:
            fh.write(line + b"\n")
    return entry


def build_corpus(
    source_specs: dict[str, dict | list[dict]],
    domains: list[str],
    out_dir: Path,
    cache_dir: Path,
    max_docs_per_domain: int | None = None,
) -> dict[str, Any]:
    """Write ``<out_dir>/<domain>.jsonl`` for every domain and return the manifest.

    A domain's source is one mapping (:func:`write_source`) or a list of them (:func:`write_sources`: every
    source in list order, a later record of an id replacing the earlier one). ``max_docs_per_domain`` (or a
    source's own ``max_docs``) takes a deterministic slice of each source.

    Raises:
        ValueError: when ``domains`` and ``source_specs`` disagree, or a domain's spec is malformed
            (:func:`source_list`).
        sources.SourceUnavailable: when a source cannot be had (never skipped quietly).
    """
    missing = [d for d in domains if d not in source_specs]
    extra = [d for d in source_specs if d not in domains]
    if missing or extra:
        raise ValueError(
            "params.yaml: every domain needs exactly one entry under corpus.sources (a source or a list of them). "
            + (f"No source for {missing} (add it under corpus.sources). " if missing else "")
            + (f"Sources {extra} are not in domains (add them to domains or remove them)." if extra else "")
        )
    specs = {domain: source_list(domain, source_specs[domain]) for domain in domains}
    manifest: dict[str, Any] = {"domains": {}, "max_docs_per_domain": max_docs_per_domain}
    for domain in tqdm(domains, desc="corpus", unit="domain"):
        target = out_dir / f"{domain}.jsonl"
        if isinstance(source_specs[domain], list | tuple):
            entry = write_sources(domain, specs[domain], target, cache_dir, max_docs_per_domain)
        else:
            entry = write_source(domain, specs[domain][0], target, cache_dir, max_docs_per_domain)
        manifest["domains"][domain] = entry
    manifest["totals"] = {
        "documents": sum(e.get("documents", e.get("lines", 0)) for e in manifest["domains"].values()),
        "chars": sum(e.get("chars", 0) for e in manifest["domains"].values()),
    }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


def external_inputs(source_specs: dict[str, dict | list[dict]]) -> list[str]:
    """What the ``type: jsonl`` sources read (those of list-form domains too), as DVC dep paths
    (:func:`input_root` of each ``uri``), each once, by domain name and then list order.

    Built-in sources read packages pinned in ``params.yaml`` (``package``), which DVC tracks as params.

    Raises:
        ValueError: a domain's spec is malformed (:func:`source_list`).
    """
    found = []
    for domain, spec in sorted(source_specs.items()):
        for entry in source_list(domain, spec):
            if entry.get("type") == "jsonl" and entry.get("uri"):
                root = input_root(entry["uri"])
                if root not in found:
                    found.append(root)
    return found

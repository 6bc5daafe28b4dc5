"""Line-by-line validation of JSONL documents: every line is kept (normalized) or rejected with a reason.

Memory stays constant in the file size: lines are read one at a time (smart_open, local or ``s3://``)
and only the set of seen ids grows. Kept records are NFC-normalized (Unicode TR15) with the spellings of
a missing value set to null. Invariant, per input file: kept + rejected = lines read (datatrove-style
stats carried with the stream).
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from domainlm.common.atomic import atomic_path, write_json
from domainlm.common.metrics import peak_rss_mb
from domainlm.documents.jsonl import JsonlWriters, dumps, expand_uris, iter_raw_lines

REQUIRED = ("id", "text", "domain")
OPTIONAL_STRINGS = ("label", "source")
MISSING_SPELLINGS = {"", "null", "none", "n/a", "na", "nan"}
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
EXCERPT_CHARS = 120

# Every reason a line can be rejected for, in the order the checks run.
REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_id",
    "missing_text",
    "missing_domain",
    "wrong_type_id",
    "wrong_type_text",
    "wrong_type_domain",
    "wrong_type_label",
    "wrong_type_source",
    "bad_domain_name",
    "unknown_domain",
    "empty_text",
    "text_too_short",
    "text_too_long",
    "duplicate_id",
)


class Rejected(Exception):
    """A line failed a check; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def is_missing(value: Any) -> bool:
    """True for the spellings of a missing value: None, NaN, "", "null", "None", "N/A", "NA", "nan" (any case)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_SPELLINGS


@dataclass
class Validator:
    """Checks one raw line at a time and remembers the ids it has kept.

    Args:
        min_chars, max_chars: allowed text length in code points after NFC, inclusive.
        domains: allowed domain names; ``None`` allows any safe file name.
    """

    min_chars: int = 30
    max_chars: int = 200_000
    domains: set[str] | None = None
    seen_ids: set[str] = field(default_factory=set)

    def check(self, raw: bytes) -> dict[str, Any]:
        """Return the normalized record for ``raw`` or raise :class:`Rejected`."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("invalid_utf8", str(exc)) from None
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise Rejected("invalid_json", str(exc)) from None
        if not isinstance(obj, dict):
            raise Rejected("not_an_object", type(obj).__name__)
        for key in REQUIRED:
            if key not in obj or obj[key] is None:
                raise Rejected(f"missing_{key}")
        rec = dict(obj)
        if isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
            raise Rejected("wrong_type_id", type(rec["id"]).__name__)
        rec["id"] = str(rec["id"])
        for key in ("text", "domain"):
            if not isinstance(rec[key], str):
                raise Rejected(f"wrong_type_{key}", type(rec[key]).__name__)
        for key in OPTIONAL_STRINGS:
            value = rec.get(key)
            if is_missing(value):
                rec[key] = None
            elif not isinstance(value, str):
                raise Rejected(f"wrong_type_{key}", type(value).__name__)
        if not DOMAIN_NAME.match(rec["domain"]):
            raise Rejected("bad_domain_name", rec["domain"][:40])
        if self.domains is not None and rec["domain"] not in self.domains:
            raise Rejected("unknown_domain", rec["domain"][:40])
        text = unicodedata.normalize("NFC", rec["text"])
        if not text.strip():
            raise Rejected("empty_text")
        if len(text) < self.min_chars:
            raise Rejected("text_too_short", f"{len(text)} < {self.min_chars}")
        if len(text) > self.max_chars:
            raise Rejected("text_too_long", f"{len(text)} > {self.max_chars}")
        if rec["id"] in self.seen_ids:
            raise Rejected("duplicate_id", rec["id"][:80])
        self.seen_ids.add(rec["id"])
        rec["text"] = text
        return rec


def excerpt(raw: bytes, limit: int = EXCERPT_CHARS) -> str:
    """A short, always-printable excerpt of a raw line (undecodable bytes replaced)."""
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class FileStats:
    """Line accounting of one input file: ``kept + rejected == lines_read``."""

    lines_read: int = 0
    kept: int = 0
    rejected: int = 0


def validate_stream(uris: Iterable[str], validator: Validator) -> Iterator[tuple[str, int, dict | None, dict | None]]:
    """Yield ``(uri, line_no, record, reject)`` for every line of every input; exactly one of record/reject is set.

    ``line_no`` is 1-based. ``reject`` is ``{"file", "line", "reason", "detail", "excerpt"}``.
    """
    for uri in uris:
        for line_no, raw in enumerate(iter_raw_lines(uri), start=1):
            try:
                yield uri, line_no, validator.check(raw), None
            except Rejected as rej:
                yield (
                    uri,
                    line_no,
                    None,
                    {"file": uri, "line": line_no, "reason": rej.reason, "detail": rej.detail, "excerpt": excerpt(raw)},
                )


def validate_files(
    inputs: list[str], out_dir: Path, validator: Validator, preview_per_domain: int = 5
) -> dict[str, Any]:
    """Validate every line of ``inputs`` (globs or URIs) into ``out_dir`` and return the metrics dict.

    Writes ``<domain>.jsonl`` (one per domain of ``validator.domains``, even if empty, plus any
    other domain seen), ``rejects.jsonl`` and ``sample_preview.json``, each file atomically.
    Lines are streamed (:func:`validate_stream`); memory grows only with the set of kept ids.

    Args:
        inputs: local globs, file paths or ``s3://bucket/prefix*.jsonl`` patterns.
        out_dir: folder to write into (created when missing).
        validator: the checks to apply (and the ids already seen).
        preview_per_domain: records per domain in ``sample_preview.json`` (texts cut to 200 chars).

    Returns:
        ``{"totals": {files, lines_read, kept, rejected, reject_rate, chars_kept}, "by_reason":
        {reason: lines} for every reason of :data:`REASONS`, "by_domain": {domain: {"kept"}},
        "by_file": {name: {lines_read, kept, rejected}}, "perf": {wall_s, lines_per_s, peak_rss_mb}}``.

    Raises:
        FileNotFoundError: when an input pattern matches nothing.
        AssertionError: if kept + rejected != lines read for a file (an internal bug; never expected).
    """
    uris = [u for pattern in inputs for u in expand_uris(pattern)]
    per_file: dict[str, FileStats] = defaultdict(FileStats)
    by_reason: Counter[str] = Counter()
    by_domain: Counter[str] = Counter()
    preview: dict[str, list[dict]] = defaultdict(list)
    t0 = time.perf_counter()
    chars = 0
    with (
        JsonlWriters(lambda d: out_dir / f"{d}.jsonl") as writers,
        atomic_path(out_dir / "rejects.jsonl") as rej_tmp,
        rej_tmp.open("w", encoding="utf-8") as rej_fh,
    ):
        for domain in sorted(validator.domains or ()):
            writers.ensure(domain)
        for uri, _, rec, reject in tqdm(validate_stream(uris, validator), desc="validate", unit="line"):
            stats = per_file[uri]
            stats.lines_read += 1
            if rec is not None:
                stats.kept += 1
                by_domain[rec["domain"]] += 1
                chars += len(rec["text"])
                writers.write(rec["domain"], rec)
                if len(preview[rec["domain"]]) < preview_per_domain:
                    preview[rec["domain"]].append({k: (v[:200] if k == "text" else v) for k, v in rec.items()})
            else:
                stats.rejected += 1
                by_reason[reject["reason"]] += 1
                rej_fh.write(dumps(reject) + "\n")
    for uri, s in per_file.items():
        assert s.kept + s.rejected == s.lines_read, (
            f"{uri}: kept {s.kept} + rejected {s.rejected} != read {s.lines_read}"
        )
    write_json(out_dir / "sample_preview.json", dict(sorted(preview.items())))
    wall = time.perf_counter() - t0
    lines = sum(s.lines_read for s in per_file.values())
    kept = sum(s.kept for s in per_file.values())
    return {
        "totals": {
            "files": len(per_file),
            "lines_read": lines,
            "kept": kept,
            "rejected": lines - kept,
            "reject_rate": (lines - kept) / lines if lines else 0.0,
            "chars_kept": chars,
        },
        "by_reason": {r: by_reason.get(r, 0) for r in REASONS},
        "by_domain": {d: {"kept": by_domain.get(d, 0)} for d in sorted(set(by_domain) | set(validator.domains or ()))},
        "by_file": {Path(u).name if not u.startswith("s3://") else u: vars(s) for u, s in sorted(per_file.items())},
        "perf": {
            "wall_s": round(wall, 3),
            "lines_per_s": round(lines / wall, 1) if wall else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }

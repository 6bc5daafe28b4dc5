"""validate: every line is kept or rejected with a reason, and the counts add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import boto3
import pytest

from domainlm.documents.validation import REASONS, Validator, is_missing, validate_files
from stages.validate import run

REPO = Path(__file__).resolve().parents[1]

GOOD_TEXT = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있다."


def line(**kw) -> bytes:
    rec = {"id": "a", "text": GOOD_TEXT, "domain": "law"}
    rec.update(kw)
    return json.dumps(rec, ensure_ascii=False).encode("utf-8")


BAD_LINES = {
    "invalid_utf8": b'{"id": "x", "text": "\xff\xfe bad bytes", "domain": "law"}',
    "invalid_json": b'{"id": "x", "text": ',
    "not_an_object": b'["id", "text"]',
    "missing_id": json.dumps({"text": GOOD_TEXT, "domain": "law"}).encode(),
    "missing_text": json.dumps({"id": "x", "domain": "law"}).encode(),
    "missing_domain": json.dumps({"id": "x", "text": GOOD_TEXT}).encode(),
    "wrong_type_id": line(id=[1]),
    "wrong_type_text": line(text=123),
    "wrong_type_domain": line(domain=5),
    "wrong_type_label": line(label=7),
    "wrong_type_source": line(source={"a": 1}),
    "bad_domain_name": line(domain="../etc"),
    "unknown_domain": line(domain="cooking"),
    "empty_text": line(text="   \n\t "),
    "text_too_short": line(text="짧은 글"),
    "text_too_long": line(text="가" * 501),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_reason_is_detected(reason):
    v = Validator(min_chars=10, max_chars=500, domains={"law", "bill"})
    with pytest.raises(Exception) as info:
        v.check(BAD_LINES[reason])
    assert info.value.reason == reason


def test_every_reason_has_a_case():
    assert set(BAD_LINES) | {"duplicate_id"} == set(REASONS)


def test_duplicate_id_rejected_second_time_only():
    v = Validator(min_chars=10)
    assert v.check(line(id="d1"))["id"] == "d1"
    with pytest.raises(Exception) as info:
        v.check(line(id="d1"))
    assert info.value.reason == "duplicate_id"


def test_integer_ids_become_strings_and_bools_do_not():
    v = Validator(min_chars=10)
    assert v.check(line(id=17))["id"] == "17"
    with pytest.raises(Exception) as info:
        v.check(line(id=True))
    assert info.value.reason == "wrong_type_id"


@pytest.mark.parametrize("spelling", ["", "null", "None", "N/A", "  na ", "NaN"])
def test_missing_value_spellings_become_null(spelling):
    v = Validator(min_chars=10)
    rec = v.check(line(label=spelling, source=spelling))
    assert rec["label"] is None and rec["source"] is None


def test_json_nan_label_becomes_null():
    v = Validator(min_chars=10)
    raw = ('{"id": "n", "text": "' + GOOD_TEXT + '", "domain": "law", "label": NaN}').encode()
    assert v.check(raw)["label"] is None
    assert is_missing(float("nan")) and not is_missing("law")


def test_text_is_nfc_normalized():
    decomposed = unicodedata.normalize("NFD", GOOD_TEXT)
    assert decomposed != GOOD_TEXT
    rec = Validator(min_chars=10).check(line(text=decomposed))
    assert rec["text"] == GOOD_TEXT


def test_length_counts_code_points_after_nfc():
    # 30 syllables are 30 code points in NFC but 60+ in NFD: NFC decides.
    text = unicodedata.normalize("NFD", "한" * 30)
    assert Validator(min_chars=30, max_chars=30).check(line(text=text))["text"] == "한" * 30


def test_validate_files_accounts_for_every_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [line(id=f"g{i}", domain="law" if i % 2 else "bill") for i in range(8)]
    bad = list(BAD_LINES.values())
    lines_a = good[:4] + bad[:8] + [line(id="g0")]  # last one duplicates an id
    lines_b = good[4:] + [b""] + bad[8:]  # a blank line in the middle
    (src / "a.jsonl").write_bytes(b"\n".join(lines_a) + b"\n")
    (src / "b.jsonl").write_bytes(b"\r\n".join(lines_b))  # CRLF, no newline after the last line
    out = tmp_path / "out"
    m = validate_files([str(src / "*.jsonl")], out, Validator(min_chars=10, max_chars=500, domains={"law", "bill"}), 3)
    assert m["by_file"]["a.jsonl"] == {"lines_read": 13, "kept": 4, "rejected": 9}
    assert m["by_file"]["b.jsonl"] == {"lines_read": 13, "kept": 4, "rejected": 9}
    assert m["totals"]["kept"] + m["totals"]["rejected"] == m["totals"]["lines_read"] == 26
    assert m["by_reason"]["duplicate_id"] == 1 and m["by_reason"]["invalid_json"] == 2  # blank line is invalid JSON
    kept = {d: [json.loads(line) for line in (out / f"{d}.jsonl").read_text().splitlines()] for d in ("law", "bill")}
    assert len(kept["law"]) == 4 and len(kept["bill"]) == 4
    assert all(r["domain"] == d for d, rs in kept.items() for r in rs)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 18
    first = rejects[0]
    assert first["file"].endswith("a.jsonl") and first["line"] == 5 and first["reason"] == "invalid_utf8"
    assert "\ufffd" in first["excerpt"]  # undecodable bytes shown, not lost
    dup = [r for r in rejects if r["reason"] == "duplicate_id"][0]
    assert dup["line"] == 13
    preview = json.loads((out / "sample_preview.json").read_text())
    assert sorted(preview) == ["bill", "law"] and all(len(v) == 3 for v in preview.values())


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input matches"):
        validate_files([str(tmp_path / "nothing*.jsonl")], tmp_path / "out", Validator())


def test_streams_from_s3(tmp_path, s3_env):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raw")
    body = b"\n".join([line(id="s1"), b"not json", line(id="s2", domain="bill")]) + b"\n"
    s3.put_object(Bucket="raw", Key="corpus/part-0.jsonl", Body=body)
    s3.put_object(Bucket="raw", Key="corpus/part-1.jsonl", Body=line(id="s3") + b"\n")
    s3.put_object(Bucket="raw", Key="other/ignored.jsonl", Body=line(id="s4") + b"\n")
    m = validate_files(["s3://raw/corpus/*.jsonl"], tmp_path / "out", Validator(min_chars=10))
    assert m["totals"] == {**m["totals"], "files": 2, "lines_read": 4, "kept": 3, "rejected": 1}
    assert m["by_reason"]["invalid_json"] == 1
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert '"file":"s3://raw/corpus/part-0.jsonl","line":2' in rejects


def test_stage_run_replaces_the_folder_and_keeps_it_on_failure(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_bytes(line(id="k1") + b"\n" + line(id="k2", domain="cooking") + b"\n")
    out = tmp_path / "validated"
    m = run([str(tmp_path / "raw" / "*.jsonl")], out, domains=["law", "bill"], min_chars=10)
    assert m["totals"]["kept"] == 1 and m["by_reason"]["unknown_domain"] == 1
    assert (out / "bill.jsonl").read_text() == ""  # every listed domain gets its file, even empty
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileNotFoundError, match="no input matches"):
        run([str(tmp_path / "raw" / "none*.jsonl")], out, domains=["law", "bill"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_stage_main_as_a_module_writes_declared_outs(tmp_path):
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "x.jsonl").write_bytes(line(id="m1") + b"\n" + b"oops\n")
    (tmp_path / "params.yaml").write_text("domains: [law]\nvalidate:\n  min_chars: 10\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stages.validate: 2 lines read: 1 kept, 1 rejected" in proc.stderr
    metrics = json.loads((tmp_path / "metrics" / "validate.json").read_text())
    assert metrics["totals"]["lines_read"] == 2 and metrics["stage"]["wall_s"] >= 0
    assert len((tmp_path / "data" / "validated" / "law.jsonl").read_text().splitlines()) == 1

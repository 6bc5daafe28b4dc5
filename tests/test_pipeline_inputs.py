"""External inputs are DVC deps: new lines in a user's JSONL source (a local file, or an object on a real
S3-compatible server) make `dvc status` report `corpus` changed, and `dvc repro` re-runs corpus and what
depends on it. A source that dvc.yaml does not declare stops the stage with a message saying what to add.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import make_pipeline_repo, run, set_params

pytestmark = pytest.mark.slow

SENTENCES = [
    "대한민국은 민주공화국이며 모든 권력은 국민으로부터 나온다고 헌법은 정한다.",
    "리브레오피스 캘크에서 셀 범위를 선택한 다음 서식 메뉴에서 조건부 서식을 고를 수 있습니다.",
    "데비안 패키지는 apt 명령으로 설치하고 dpkg 명령으로 내용을 풀어 볼 수 있습니다.",
    "법률안은 국회의원 열 명 이상의 찬성으로 발의되며 소관 상임위원회에 회부된다.",
]


def news_lines(start: int, n: int) -> str:
    return "".join(
        json.dumps(
            {"doc_id": f"news-{i:05d}", "body": f"{SENTENCES[i % 4]} 기사 번호 {i}번입니다.", "topic": "news"},
            ensure_ascii=False,
        )
        + "\n"
        for i in range(start, start + n)
    )


def add_dep(repo: Path, stage: str, dep: str) -> None:
    path = repo / "dvc.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["stages"][stage]["deps"].append(dep)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def lines_read(repo: Path) -> int:
    return json.loads((repo / "metrics" / "validate.json").read_text())["totals"]["lines_read"]


def only_sources(repo: Path, sources: dict) -> None:
    """Make ``sources`` the whole ``corpus.sources`` (set_params merges dicts) and commit."""
    set_params(repo, {"corpus": {"sources": None}})
    set_params(repo, {"domains": sorted(sources), "corpus": {"sources": sources}})
    run(["git", "commit", "-qam", "sources"], repo)


def jsonl_repo(path: Path, uri: str) -> Path:
    repo = make_pipeline_repo(path)
    only_sources(
        repo, {"news": {"type": "jsonl", "uri": uri, "fields": {"id": "doc_id", "text": "body", "label": "topic"}}}
    )
    return repo


def test_undeclared_source_stops_corpus_with_the_line_to_add(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "part-0.jsonl").write_text(news_lines(0, 5), encoding="utf-8")
    repo = jsonl_repo(tmp_path / "repo", str(incoming / "*.jsonl"))
    proc = run(["dvc", "repro", "corpus"], repo, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "does not list as deps of 'corpus'" in out and f"- {incoming}" in out
    assert not (repo / "data" / "raw" / "news.jsonl").exists()
    assert (
        "corpus\t" in (repo / "logs" / "pipeline_run.log").read_text()
        and "\tfailed\t" in (repo / "logs" / "pipeline_run.log").read_text()
    )


def test_local_source_growth_reruns_corpus_and_dependents(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    src = incoming / "part-0.jsonl"
    src.write_text(news_lines(0, 20), encoding="utf-8")
    repo = jsonl_repo(tmp_path / "repo", str(incoming / "*.jsonl"))
    add_dep(repo, "corpus", str(incoming))
    run(["git", "commit", "-qam", "declare the news source"], repo)
    assert ran_stages(run(["dvc", "repro", "validate"], repo).stdout) == ["corpus", "validate"]
    assert lines_read(repo) == 20
    assert "up to date" in run(["dvc", "status", "--with-deps", "validate"], repo).stdout.lower()

    with src.open("a", encoding="utf-8") as fh:  # new data arrives: one more line
        fh.write(news_lines(20, 1))
    status = run(["dvc", "status", "--with-deps", "validate"], repo).stdout
    assert "corpus:" in status and "changed deps" in status and str(incoming) in status
    assert "validate:" not in status  # it changes only once corpus has re-run
    assert ran_stages(run(["dvc", "repro", "validate"], repo).stdout) == ["corpus", "validate"]
    assert lines_read(repo) == 21
    (incoming / "part-1.jsonl").write_text(news_lines(21, 4), encoding="utf-8")  # a new file in the folder
    assert "corpus:" in run(["dvc", "status", "--with-deps", "validate"], repo).stdout
    run(["dvc", "repro", "validate"], repo)
    assert lines_read(repo) == 25
    log = (repo / "logs" / "pipeline_run.log").read_text().splitlines()
    assert [line.split("\t")[0] for line in log] == ["corpus", "validate"] * 3
    assert all(line.split("\t")[3] == "ok" for line in log)


def test_s3_source_growth_reruns_corpus_and_dependents(tmp_path, s3_env):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="user-corpus")
    s3.put_object(Bucket="user-corpus", Key="news/part-0.jsonl", Body=news_lines(0, 20).encode())
    repo = jsonl_repo(tmp_path / "repo", "s3://user-corpus/news/*.jsonl")
    add_dep(repo, "corpus", "s3://user-corpus/news")
    run(["git", "commit", "-qam", "declare the news source"], repo)
    assert ran_stages(run(["dvc", "repro", "validate"], repo).stdout) == ["corpus", "validate"]
    assert lines_read(repo) == 20
    assert "up to date" in run(["dvc", "status", "--with-deps", "validate"], repo).stdout.lower()

    s3.put_object(Bucket="user-corpus", Key="news/part-0.jsonl", Body=news_lines(0, 21).encode())  # new ETag
    status = run(["dvc", "status", "--with-deps", "validate"], repo).stdout
    assert "corpus:" in status and "s3://user-corpus/news" in status
    assert ran_stages(run(["dvc", "repro", "validate"], repo).stdout) == ["corpus", "validate"]
    assert lines_read(repo) == 21


def test_validate_inputs_outside_the_pipeline_must_be_declared(tmp_path):
    incoming = tmp_path / "extra"
    incoming.mkdir()
    (incoming / "more.jsonl").write_text(
        "".join(
            json.dumps({"id": f"x{i}", "text": SENTENCES[i % 4], "domain": "law"}, ensure_ascii=False) + "\n"
            for i in range(6)
        ),
        encoding="utf-8",
    )
    repo = make_pipeline_repo(
        tmp_path / "repo",
        {
            "corpus": {"max_docs_per_domain": 10},
            "validate": {"inputs": ["data/raw/*.jsonl", str(incoming / "*.jsonl")]},
        },
    )
    only_sources(repo, {"law": {"type": "kolaw"}})
    proc = run(["dvc", "repro", "validate"], repo, check=False)
    assert proc.returncode != 0 and "does not list as deps of 'validate'" in proc.stdout + proc.stderr
    add_dep(repo, "validate", str(incoming))
    run(["dvc", "repro", "validate"], repo)
    assert lines_read(repo) == 10 + 6
    (incoming / "more.jsonl").write_text(
        (incoming / "more.jsonl").read_text()
        + (incoming / "more.jsonl").read_text().splitlines(keepends=True)[0].replace('"x0"', '"x6"'),
        encoding="utf-8",
    )
    status = run(["dvc", "status", "--with-deps", "validate"], repo).stdout
    assert "validate:" in status and "corpus:" not in status
    assert ran_stages(run(["dvc", "repro", "validate"], repo).stdout) == ["validate"]
    assert lines_read(repo) == 17

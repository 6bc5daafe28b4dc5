"""Shared test fixtures: real servers on free loopback ports, the project root, offline Hugging Face."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Every Ray process the tests start binds to 127.0.0.1 (on Linux, Ray otherwise binds to the machine's interface
# address, even for an address of 127.0.0.1); Ray reads this on import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test that runs real tools for a while (CI runs it)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port, no persistence. Yields ``(host, port)``."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(
            "redis-server is not installed: run `make test` (it apt-installs redis-server) "
            "or `apt-get install redis-server`"
        )
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, "redis-server")
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on a free loopback port. Yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (and so smart_open and dvc-s3) at the moto server with dummy credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


# ------------------------------------------------------------------------------------------ pipeline repos
PIPELINE_FILES = (
    "stages",
    "domainlm",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    "data/labels",
    "reports/summary.ipynb",
    "benchmarks/results/io_speed.csv",
)


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (a list, or a shell string) in ``cwd`` with the venv's tools first on PATH; return the result.

    Raises:
        AssertionError: with the command's output, when ``check`` and it exits non-zero.
    """
    full_env = dict(os.environ)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def set_params(repo: Path, updates: dict) -> None:
    """Merge ``updates`` (nested dicts) into ``repo/params.yaml``."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(params, updates)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def make_pipeline_repo(path: Path, param_updates: dict | None = None) -> Path:
    """A fresh git + DVC repository at ``path`` holding this project's pipeline code and params.

    The corpus cache is shared with the project (absolute ``corpus.cache_dir``), so no package is
    fetched twice. ``param_updates`` are merged into params.yaml before the first commit.
    """
    path.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            # data/labels: the overrides file only; split_labels.parquet is the split stage's output
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__", "split_labels.parquet"))
        elif src.exists():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    updates = {"corpus": {"cache_dir": str(ROOT / ".cache" / "corpus")}}
    set_params(path, updates)
    if param_updates:
        set_params(path, param_updates)
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "config", "user.email", "ci@example.com"], path)
    run(["git", "config", "user.name", "CI"], path)
    run(["dvc", "init", "-q"], path)
    shutil.copytree(ROOT / ".dvc" / "plots", path / ".dvc" / "plots")  # custom plot templates
    run(["dvc", "config", "core.autostage", "true"], path)
    run(["dvc", "remote", "add", "-d", "local", str(path.parent / f"{path.name}-dvcstore")], path)
    overrides = path / "data" / "labels" / "overrides.parquet"
    if not overrides.exists():  # a fresh clone has only the .dvc pointer; the file starts empty
        from domainlm.documents.labels import write_empty_overrides

        write_empty_overrides(overrides)
    run(["dvc", "add", "-q", "data/labels/overrides.parquet"], path)  # into this repo's cache
    deployed = path / "models" / "deployed"
    if not deployed.exists():  # likewise the deployed classifier: a fresh clone starts with nothing deployed
        from domainlm.rounds.promotion import write_bootstrap

        write_bootstrap(deployed)
    run(["dvc", "add", "-q", "models/deployed"], path)
    # the LM release: release 0 (no documents frozen; the LM follows the split) until a round or release-lm cuts one
    from domainlm.documents.release import write_bootstrap as write_release_bootstrap

    write_release_bootstrap(path / "data" / "release")
    run(["dvc", "add", "-q", "data/release"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-q", "-m", "pipeline"], path)
    return path

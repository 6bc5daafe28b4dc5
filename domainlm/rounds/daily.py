"""One round of the daily loop, safe to schedule: ``python -m domainlm.rounds round`` (``make round``).

Order (data is pushed before the commit that names it): take the lock → cut an LM release first when one is due
(:func:`domainlm.rounds.release.release_due`: none cut yet, a new domain, or ``release.new_fraction``) → ``dvc repro``
(between releases no LM stage runs: only the data stages, ``lm_data``, ``refine_labels``, ``train_classifier`` and
``report``) (``train_classifier`` scores the
deployed model first and keeps it or fine-tunes from it) → :func:`domainlm.rounds.promotion.decide` → promote
(``champion`` alias, ``models/deployed``, ``dvc add``) → ``dvc push`` → ``git commit`` of ``dvc.lock``, the ``.dvc``
files, metrics, plots and the report → tag ``round-YYYYMMDD-N`` → deploy (:func:`domainlm.rounds.server.deploy`).

Exit codes (:data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_GATE_FAILED`): 0 when it promoted, kept the deployed
model, or found nothing new; 2 when the gate failed (``train_classifier`` wrote and sent the alert; the round is still
committed and tagged, nothing is promoted); 1 on an error, including another round holding the lock. A second run
with no new data runs no stage, commits nothing and creates no tag.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.classify.deployed import read_manifest
from domainlm.common import params as P
from domainlm.common import paths
from domainlm.documents import release as rel
from domainlm.rounds import promotion, release
from domainlm.rounds.promotion import GATE_FAILED, KEEP, NOTHING, PROMOTE, Decision

log = logging.getLogger("domainlm.rounds")

EXIT_OK, EXIT_ERROR, EXIT_GATE_FAILED = 0, 1, 2
LOCK_FILE = Path(".cache/round.lock")
CLASSIFIER_METRICS = paths.METRICS_DIR / "classifier.json"
#: What a round commits (those that exist): DVC's lock and pointers, metrics, plots, the report, the eval table.
COMMITTED = (
    "dvc.lock",
    "models/deployed.dvc",
    "data/release.dvc",
    "data/labels/overrides.parquet.dvc",
    "metrics",
    "plots",
    "reports",
    "eval",
)
#: ...and every ``.gitignore`` DVC writes beside an output (git pathspec).
GITIGNORES = ":(glob)**/.gitignore"


class RoundBusy(RuntimeError):
    """Another round holds the lock."""


@dataclass
class RoundResult:
    """What a round did: ``decision`` (:class:`Decision`), ``ran`` (stage names ``dvc repro`` ran), ``commit`` and
    ``tag`` (``None`` when nothing was committed), ``served`` (the server record after a deploy), ``seconds``,
    ``lm_release`` (:class:`domainlm.rounds.release.ReleaseResult` as a dict when the round cut one first)."""

    decision: Decision
    ran: list[str] = field(default_factory=list)
    commit: str | None = None
    tag: str | None = None
    served: dict[str, Any] | None = None
    seconds: float = 0.0
    lm_release: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_GATE_FAILED if self.decision.action == GATE_FAILED else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.as_dict(),
            "ran": self.ran,
            "commit": self.commit,
            "tag": self.tag,
            "served": self.served,
            "seconds": round(self.seconds, 1),
            "lm_release": self.lm_release,
            "exit_code": self.exit_code,
        }


class RoundLock:
    """An exclusive, non-blocking ``flock(2)`` on ``path`` for the round's lifetime (released when the process
    dies, so a crashed round never blocks the next one).

    Raises:
        RoundBusy: (on enter) another process holds it.
    """

    def __init__(self, path: str | os.PathLike = LOCK_FILE):
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> RoundLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise RoundBusy(f"another round holds {self.path}; not starting a second one") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def sh(cmd: Sequence[str], *, cwd: str | os.PathLike = ".", check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` and capture its output.

    Raises:
        RuntimeError: it exited non-zero (``check``), with its last output lines.
    """
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def repro(dvc: str = "dvc", targets: Sequence[str] = (), *, cwd: str | os.PathLike = ".") -> list[str]:
    """``dvc repro [targets]``, its output passed through to stdout line by line; returns the stages it ran.

    Raises:
        RuntimeError: ``dvc repro`` failed (a stage failed, or DVC is busy).
    """
    ran: list[str] = []
    proc = subprocess.Popen(
        [dvc, "repro", *targets], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tail: list[str] = []
    for line in _lines(proc):
        sys.stdout.write(line)
        sys.stdout.flush()
        tail = (tail + [line])[-40:]
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro exited {proc.returncode}:\n{''.join(tail)}")
    return ran


def _lines(proc: subprocess.Popen) -> Iterator[str]:
    assert proc.stdout is not None
    yield from proc.stdout


def pending_changes(cwd: str | os.PathLike = ".") -> list[str]:
    """``git status --porcelain`` lines of :data:`COMMITTED` paths: what a round would commit."""
    existing = [p for p in COMMITTED if (Path(cwd) / p).exists()] + [GITIGNORES]
    out = sh(["git", "status", "--porcelain", "--", *existing], cwd=cwd).stdout
    return [line for line in out.splitlines() if line.strip()]


def next_tag(day: dt.date, cwd: str | os.PathLike = ".") -> str:
    """``round-YYYYMMDD-N``, N one more than the day's highest existing tag (1 for the first)."""
    prefix = f"round-{day:%Y%m%d}-"
    numbers = [
        int(t[len(prefix) :])
        for t in sh(["git", "tag", "--list", f"{prefix}*"], cwd=cwd).stdout.split()
        if t[len(prefix) :].isdigit()
    ]
    return f"{prefix}{max(numbers, default=0) + 1}"


def pull_or_bootstrap(
    target: str | os.PathLike, bootstrap: Callable[[Path], Any], *, dvc: str = "dvc", cwd: str | os.PathLike = "."
) -> None:
    """Make the ``dvc add``-ed ``target`` exist: ``dvc pull <target>.dvc``, or ``bootstrap(path)`` when the remote
    lacks it (a fresh clone)."""
    path = Path(cwd) / target
    if path.exists():
        return
    pulled = subprocess.run([dvc, "pull", "-q", f"{target}.dvc"], cwd=cwd, capture_output=True)
    if pulled.returncode != 0 or not path.exists():
        bootstrap(path)


def ensure_deployed(dvc: str = "dvc", cwd: str | os.PathLike = ".") -> None:
    """Make ``models/deployed`` exist: ``dvc pull`` it, or write the bootstrap folder when the remote lacks it."""
    pull_or_bootstrap(paths.DEPLOYED_DIR, promotion.write_bootstrap, dvc=dvc, cwd=cwd)


def decide_and_promote(*, dvc: str = "dvc", promote: bool = True) -> Decision:
    """Read ``metrics/classifier.json`` and the current test split, :func:`decide`, and promote when it says so.

    The registry versions it uses are this machine's (:func:`domainlm.rounds.promotion.ensure_version`): a promote
    registers ``models/classifier`` here when this store lacks the version the metrics name, and a keep registers
    ``models/deployed`` when it lacks the manifest's (:func:`domainlm.rounds.promotion.keep_champion`). The returned
    decision carries the local ``version`` (after a promote) and ``champion_version``.

    Raises:
        FileNotFoundError: no ``metrics/classifier.json`` (``train_classifier`` has not run).
    """
    from mlflow import MlflowClient

    from domainlm.classify.data import read_split, split_files_sha256, split_sha256
    from domainlm.common.tracking import tracking_uri

    metrics = json.loads(CLASSIFIER_METRICS.read_text(encoding="utf-8"))
    cfg = P.section("classifier")
    model_name = (cfg.get("registry") or {}).get("model_name", "domain-lm-classifier")
    domains = P.domains()
    test = read_split(paths.SPLIT_DIR, paths.LABELS_PATH, domains, "test")
    test_sha = split_sha256(test)
    manifest = read_manifest(paths.DEPLOYED_DIR)
    if (
        manifest is not None
        and int(metrics["gate"]["passed"])  # a failed gate is reported as such, whatever model the run kept
        and (
            int(manifest["version"]) == int(metrics["registry"]["version"])
            or promotion.same_model(paths.CLASSIFIER_DIR, paths.DEPLOYED_DIR)
        )
    ):
        others = promotion.candidates_text(metrics)  # a release day: the candidates it beat
        return Decision(
            KEEP,
            f"v{manifest['version']} is already deployed"
            + (f": it passed the gate on the current test split and no candidate beat it ({others})" if others else ""),
            float(metrics["lora"]["macro_f1"]),
            float(manifest["test_macro_f1"]),
            int(manifest["version"]),
        )

    def rescore() -> float:
        from domainlm.classify.training import scoring_kwargs
        from domainlm.common.compute import resolve

        scoring = scoring_kwargs(cfg, resolve(P.load_params().get("compute")))
        return promotion.rescore_deployed(paths.DEPLOYED_DIR, test.texts, test.labels, **scoring)

    decision = promotion.decide(metrics, manifest, test_sha256=test_sha, rescore=rescore)
    log.info("decision: %s: %s", decision.action, decision.reason)
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    if decision.action != PROMOTE and manifest is not None and promote:
        # the deployed model stays champion (registered here first when this store lacks it)
        kept = promotion.keep_champion(
            client, model_name, manifest, paths.DEPLOYED_DIR, serving_config=serving_config()
        )
        decision = dataclasses.replace(decision, champion_version=kept.version)
    if decision.action == PROMOTE and promote:
        config = json.loads((paths.CLASSIFIER_DIR / "model" / "config.json").read_text(encoding="utf-8"))
        classes = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        deployed = promotion.promote(
            metrics=metrics,
            client=client,
            model_name=model_name,
            test_sha256=test_sha,
            classifier_dir=paths.CLASSIFIER_DIR,
            deployed_dir=paths.DEPLOYED_DIR,
            merged_dir=paths.MERGED_DIR,
            classes=classes,
            serving_config=serving_config(),
            data_sha256=split_files_sha256(paths.SPLIT_DIR, paths.LABELS_PATH, domains),
            dvc=dvc,
        )
        version, reason = int(deployed["version"]), decision.reason
        if version != decision.version:  # registered here (promotion.ensure_version); the metrics stay as they are
            reason += (
                f"; deployed as v{version}: this MLflow store does not hold the v{decision.version} that "
                f"{CLASSIFIER_METRICS} names"
            )
        decision = dataclasses.replace(decision, reason=reason, version=version, champion_version=version)
    return decision


def serving_config() -> dict[str, Any]:
    """The served pyfunc's ``model_config``, as ``train_classifier`` logs it to the registry: ``classifier.max_length``,
    the prediction windows, ``classifier.serving`` and ``compute.dtype`` (``auto`` is resolved by the server)."""
    from domainlm.classify.training import windows_params

    cfg = P.section("classifier")
    _, n_predict_windows = windows_params(cfg)
    dtype = (P.load_params().get("compute") or {}).get("dtype") or "fp32"
    return {
        "max_length": int(cfg["max_length"]),
        "max_windows": n_predict_windows,
        **(cfg.get("serving") or {}),
        "dtype": dtype,
    }


def run_round(
    *,
    deploy: bool = True,
    push: bool = True,
    host: str = "127.0.0.1",
    ports: Sequence[int] = (5077, 5078),
    dvc: str = "dvc",
    today: dt.date | None = None,
) -> RoundResult:
    """One round in the current directory (the repository root), under :class:`RoundLock`.

    Raises:
        RoundBusy: another round is running.
        RuntimeError: ``dvc repro``, ``dvc push`` or a git command failed; the new server did not come up.
    """
    started = time.monotonic()
    with RoundLock(LOCK_FILE):
        ensure_deployed(dvc)
        ran: list[str] = []
        cut = None
        if release.in_pipeline():
            release.ensure_release(dvc)
            if rel.read_release(paths.RELEASE_DIR)["release"] == 0 or release.new_fraction() is not None:
                ran += repro(dvc, ["split"])  # today's split, to freeze or to count its new documents
            why = release.release_due()
            cut = release.release_lm(reason=why, dvc=dvc, push=push) if why else None
        ran += [s for s in repro(dvc) if s not in ran]
        pending = pending_changes()
        if not ran and not pending and cut is None:
            decision = Decision(NOTHING, "no stage changed and nothing is left to commit")
            log.info("round: nothing new (no stage ran); no commit, no tag")
            return RoundResult(decision, ran, seconds=time.monotonic() - started)
        cut_dict = cut.as_dict() if cut is not None else None
        decision = decide_and_promote(dvc=dvc)
        if push:
            sh([dvc, "push", "-q"])
        existing = [p for p in COMMITTED if Path(p).exists()] + [GITIGNORES]
        sh(["git", "add", "-A", "--", *existing])
        commit = tag = None
        if sh(["git", "diff", "--cached", "--quiet", "--", *existing], check=False).returncode != 0:
            tag = next_tag(today or dt.datetime.now(dt.UTC).date())
            message = f"{tag}: {decision.action}: {decision.reason}\n\nstages run: {', '.join(ran) or 'none'}"
            if cut is not None:
                message += f"\nLM release {cut.number} cut first ({cut.tag}): {cut.reason}"
            sh(["git", "commit", "-q", "-m", message, "--", *existing])
            commit = sh(["git", "rev-parse", "HEAD"]).stdout.strip()
            sh(["git", "tag", "-a", tag, "-m", message])
            log.info("committed %s and tagged it %s", commit[:10], tag)
        served = None
        if deploy and decision.action == PROMOTE:
            from domainlm.rounds.server import deploy as deploy_server

            served = deploy_server(paths.DEPLOYED_DIR, serving_config(), host=host, ports=ports)
        return RoundResult(decision, ran, commit, tag, served, time.monotonic() - started, cut_dict)

"""The stage contract: every DVC entry point runs its body inside :func:`stage_run`.

It gives every stage the same things, so ``stages/<name>.py`` holds only its own logic:

- one logging format (``<time> <level> <logger>: <message>`` on stderr);
- wall time and peak RSS, added to the stage's metrics file under ``stage`` (seconds, MiB);
- one line per run appended to ``logs/pipeline_run.log``: stage, start time (UTC, ISO 8601), wall s,
  ``ok`` or ``failed``, git commit (tab-separated);
- the stack trace of a failed run appended to ``logs/pipeline_errors.log``;
- one command line: :func:`parse_stage_args` answers ``--help`` and rejects arguments the stage does not take
  before :func:`stage_run` starts, so neither is logged as a run.

Both logs are git-ignored and listed in ``.dvcignore``: they are not DVC outputs, so a re-run never
erases them, and they never change a stage's deps.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainlm.common import paths
from domainlm.common.metrics import peak_rss_mb, write_metrics

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"
RUN_LOG_FIELDS = ("stage", "started_utc", "wall_s", "status", "git_commit")


def configure_logging(level: int = logging.INFO) -> None:
    """Set the one logging format every stage uses (root logger, stderr). Idempotent."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT, force=True)
    # Libraries that log every HTTP call or file at INFO would drown the stage's own lines.
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m stages.<name>``, with the module docstring as its description.

    It declares no arguments: a stage that takes some adds them (``refine_labels`` adds ``promote``). ``--help`` prints
    the usage and the description and exits 0.
    """
    return argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_stage_args(name: str, doc: str | None, argv: Sequence[str], *, domain: bool = False) -> argparse.Namespace:
    """Parse a stage entry point's command line. Call it before :func:`stage_run`.

    Args:
        name: the stage's module name under ``stages/`` (``train_lora``); the usage line reads
            ``python -m stages.<name>``.
        doc: the module docstring, shown by ``--help``.
        argv: the arguments after the module name: ``sys.argv[1:]`` in ``__main__``, a list in a test. ``main()``
            never reads ``sys.argv`` itself, so calling it inside pytest does not see pytest's arguments.
        domain: the stage takes one positional ``domain`` (a ``foreach`` stage: ``python -m stages.train_lora law``).

    Returns:
        The parsed arguments (``.domain`` when ``domain`` is true).

    Raises:
        SystemExit: 0 after ``--help``; 2, with the usage line on stderr, for a missing or unknown argument.
            Neither writes ``logs/pipeline_run.log``.
    """
    parser = stage_parser(name, doc)
    if domain:
        parser.add_argument("domain", help="one of params.yaml's domains")
    return parser.parse_args(list(argv))


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit (``HEAD``), or ``"unknown"`` outside a git repository."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10, cwd=cwd
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class StageRun:
    """What a stage body gets from :func:`stage_run`: its name, logger and start time.

    Attributes:
        name: the DVC stage name (``train_lora@law`` for a foreach stage).
        log: a logger named ``stages.<module>``.
        started: ``time.perf_counter()`` at the start (seconds).
        metrics_root: where :meth:`write_metrics` writes (``metrics/`` in the pipeline).
    """

    name: str
    log: logging.Logger
    started: float
    metrics_root: Path = paths.METRICS_DIR
    written: list[Path] = field(default_factory=list)
    compute: Any = None

    def use_compute(self, policy):
        """Apply a resolved compute policy (:func:`domainlm.common.compute.resolve` of the ``compute`` params) to
        this process, log it, and record it: every later :meth:`write_metrics` adds a ``compute`` section
        (dtype, bf16, threads, device). Returns the policy."""
        self.compute = policy
        self.compute.apply()
        self.log.info("compute: %s", self.compute.describe())
        return self.compute

    def wall_s(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self.started

    def write_metrics(self, metrics_name: str, values: dict[str, Any]) -> Path:
        """Write ``<metrics_root>/<metrics_name>.json`` atomically, with ``stage.wall_s`` and
        ``stage.peak_rss_mb`` (this process, MiB) added, and ``compute`` after :meth:`use_compute`.
        ``metrics_name`` may contain ``/``."""
        values = dict(values)
        if self.compute is not None:
            values["compute"] = self.compute.metrics()
        values["stage"] = {"wall_s": round(self.wall_s(), 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
        path = write_metrics(metrics_name, values, root=self.metrics_root)
        self.written.append(path)
        return path


def append_line(path: Path, text: str) -> None:
    """Append ``text`` (one line or a block) to ``path``, creating its folder. Never raises on I/O:
    a log that cannot be written must not fail the stage it reports on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:  # pragma: no cover - a read-only checkout
        logging.getLogger("stages").warning("cannot append to %s: %s", path, exc)


@contextlib.contextmanager
def stage_run(
    name: str,
    *,
    logger: str | None = None,
    run_log: Path = paths.RUN_LOG,
    error_log: Path = paths.ERROR_LOG,
    metrics_root: Path = paths.METRICS_DIR,
) -> Iterator[StageRun]:
    """Run a stage body: one log format, timing, the run log and, on failure, the error log.

    Args:
        name: the DVC stage name, as ``dvc.yaml`` shows it.
        logger: logger name (default ``stages.<name before '@'>``).
        run_log, error_log, metrics_root: where to write (the pipeline's defaults; tests pass others).

    Yields:
        A :class:`StageRun`. The exception of a failed body is re-raised after it is logged.
    """
    configure_logging()
    log = logging.getLogger(logger or f"stages.{name.split('@')[0]}")
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    run = StageRun(name=name, log=log, started=time.perf_counter(), metrics_root=Path(metrics_root))
    status = "failed"
    try:
        yield run
        status = "ok"
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("%s: %s", name, disk_full_message(exc))
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            append_line(Path(error_log), f"=== {name} {started_utc} {git_commit()}\n{traceback.format_exc()}")
        else:
            status = "ok"
        raise
    finally:
        append_line(Path(run_log), "\t".join([name, started_utc, f"{run.wall_s():.3f}", status, git_commit()]))
        log.info(
            "%s %s in %.1f s (peak RSS %.0f MiB)",
            name,
            "finished" if status == "ok" else "FAILED",
            run.wall_s(),
            peak_rss_mb(),
        )


def disk_full_message(exc: OSError) -> str:
    """A one-line explanation of a full disk (``ENOSPC``) or an exceeded quota (``EDQUOT``): the file being written,
    the space left on its filesystem, and why no half-written output remains (:mod:`domainlm.common.atomic`)."""
    where = exc.filename or "an output file"
    free = ""
    with contextlib.suppress(OSError, TypeError):
        folder = Path(where).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        st = os.statvfs(folder)
        free = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on that filesystem now)"
    what = "no space left on the device" if exc.errno == errno.ENOSPC else "the disk quota is exceeded"
    return (
        f"{what} while writing {where}{free}. Outputs are written to a temporary beside the target and renamed "
        "only when complete, so no partial output was left; free space (or move the output's folder to a larger "
        "disk) and re-run `dvc repro`."
    )


def fail(message: str) -> None:
    """End a stage with a clear one-line message and exit status 1 (for bad input or params)."""
    print(message, file=sys.stderr)
    raise SystemExit(1)

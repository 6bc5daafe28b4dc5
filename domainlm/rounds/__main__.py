"""``python -m domainlm.rounds <command>``: ``round`` (the daily round), ``release-lm`` (freeze today's split as
the next LM release, :mod:`domainlm.rounds.release`), ``promote`` (decide and promote from the
last ``dvc repro``), ``serve`` / ``stop`` (serve ``models/deployed``), ``bootstrap`` (the empty ``models/deployed``).
Run from the repository root.

The same commands are ``domainlm round``, ``domainlm release-lm``, ``domainlm promote``, ``domainlm serve start``,
``domainlm serve stop`` and ``domainlm bootstrap`` (:mod:`domainlm.cli`); both call :func:`run_command`, so they share
behaviour and exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from domainlm.common import paths
from domainlm.common.stage import configure_logging

log = logging.getLogger("domainlm.rounds")

COMMANDS = ("round", "release-lm", "promote", "serve", "stop", "bootstrap")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = "5077,5078"


def run_command(
    command: str,
    *,
    deploy: bool = True,
    push: bool = True,
    host: str = DEFAULT_HOST,
    ports: str = DEFAULT_PORTS,
    commit: bool = True,
    bootstrap: bool = False,
) -> int:
    """Run one command of the daily loop in the current folder (the repository root) and return its exit status.

    Args:
        command: one of :data:`COMMANDS`.
        deploy: ``round`` restarts the model server after a promotion.
        push: ``round`` runs ``dvc push``.
        host: ``round`` and ``serve``: the address the model server listens on.
        ports: ``round`` and ``serve``: the blue/green port pair, comma-separated (``"5077,5078"``).
        commit: ``release-lm`` commits ``data/release.dvc`` and tags ``lm-release-N``.
        bootstrap: ``release-lm`` only where ``data/release`` is missing (a fresh clone whose remote lacks it): write
            release 0, then cut release 1 from today's split, without a commit or a push.

    Returns:
        ``round``: the round's exit code (0 done, 1 failed, 2 gate failed: :mod:`domainlm.rounds.daily`);
        ``promote``: 2 when the gate failed, else 0; any command: 1 when it raised (the exception and its traceback
        are logged, never re-raised, so a scheduler sees the code and one log line).

    Raises:
        ValueError: ``command`` is not one of :data:`COMMANDS`.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")
    configure_logging()
    try:
        if command == "round":
            from domainlm.rounds.daily import run_round

            result = run_round(deploy=deploy, push=push, host=host, ports=[int(p) for p in ports.split(",")])
            print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
            return result.exit_code
        if command == "release-lm":
            from domainlm.documents.release import write_bootstrap as write_release_bootstrap
            from domainlm.rounds.daily import LOCK_FILE, RoundLock
            from domainlm.rounds.release import release_lm

            with RoundLock(LOCK_FILE):
                if bootstrap:
                    if paths.RELEASE_DIR.exists():
                        log.info("%s exists; nothing to bootstrap", paths.RELEASE_DIR)
                        return 0
                    write_release_bootstrap(paths.RELEASE_DIR)
                    commit = push = False
                cut = release_lm(reason="bootstrap" if bootstrap else "requested", commit=commit, push=push)
            print(json.dumps(cut.as_dict(), ensure_ascii=False), flush=True)
            return 0
        if command == "promote":
            from domainlm.rounds.daily import decide_and_promote

            decision = decide_and_promote()
            print(json.dumps(decision.as_dict(), ensure_ascii=False), flush=True)
            return 2 if decision.action == "gate_failed" else 0
        if command == "serve":
            from domainlm.rounds.daily import serving_config
            from domainlm.rounds.server import deploy as deploy_server

            state = deploy_server(
                paths.DEPLOYED_DIR, serving_config(), host=host, ports=[int(p) for p in ports.split(",")]
            )
            print(json.dumps(state), flush=True)
            return 0
        if command == "stop":
            from domainlm.rounds.server import stop

            log.info("stopped server pid %s", stop())
            return 0
        from domainlm.rounds.promotion import write_bootstrap

        if not paths.DEPLOYED_DIR.exists():
            write_bootstrap(paths.DEPLOYED_DIR)
        return 0
    except Exception as exc:  # the scheduler sees exit 1 and this line; the traceback goes to the log
        log.exception("%s failed: %s", command, exc)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m domainlm.rounds``: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run_command`."""
    parser = argparse.ArgumentParser(prog="python -m domainlm.rounds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("round", help="lock, dvc repro, decide, promote, dvc push, commit, tag, deploy")
    r.add_argument("--no-deploy", action="store_true", help="do not restart the model server after a promotion")
    r.add_argument("--no-push", action="store_true", help="skip dvc push (no remote configured)")
    for p in (r, sub.add_parser("serve", help="serve models/deployed (blue/green restart when it changed)")):
        p.add_argument("--host", default=DEFAULT_HOST)
        p.add_argument("--ports", default=DEFAULT_PORTS, help=f"the blue/green port pair (default {DEFAULT_PORTS})")
    rl = sub.add_parser(
        "release-lm", help="freeze today's split as the next LM release (dvc add, push, commit, tag lm-release-N)"
    )
    rl.add_argument("--no-commit", action="store_true", help="cut and dvc add only: no commit, no tag")
    rl.add_argument("--no-push", action="store_true", help="skip dvc push (no remote configured)")
    rl.add_argument("--bootstrap", action="store_true", help="a fresh clone: only when data/release is missing")
    sub.add_parser("promote", help="decide from metrics/classifier.json and promote (no repro, commit or tag)")
    sub.add_parser("stop", help="stop the model server `serve` started")
    sub.add_parser("bootstrap", help=f"create {paths.DEPLOYED_DIR} with a version-null manifest when it is missing")
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("host", "ports") if hasattr(args, k)}
    if args.command == "round":
        options.update(deploy=not args.no_deploy, push=not args.no_push)
    if args.command == "release-lm":
        options.update(commit=not args.no_commit, push=not args.no_push, bootstrap=args.bootstrap)
    return run_command(args.command, **options)


if __name__ == "__main__":
    sys.exit(main())

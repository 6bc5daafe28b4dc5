"""``python -m domainlm.rounds <command>``: ``round`` (the daily round), ``promote`` (decide and promote from the
last ``dvc repro``), ``serve`` / ``stop`` (serve ``models/deployed``), ``bootstrap`` (the empty ``models/deployed``).
Run from the repository root."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from domainlm.common import paths
from domainlm.common.stage import configure_logging

log = logging.getLogger("domainlm.rounds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m domainlm.rounds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("round", help="lock, dvc repro, decide, promote, dvc push, commit, tag, deploy")
    r.add_argument("--no-deploy", action="store_true", help="do not restart the model server after a promotion")
    r.add_argument("--no-push", action="store_true", help="skip dvc push (no remote configured)")
    for p in (r, sub.add_parser("serve", help="serve models/deployed (blue/green restart when it changed)")):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--ports", default="5077,5078", help="the blue/green port pair (default 5077,5078)")
    sub.add_parser("promote", help="decide from metrics/classifier.json and promote (no repro, commit or tag)")
    sub.add_parser("stop", help="stop the model server `serve` started")
    sub.add_parser("bootstrap", help=f"create {paths.DEPLOYED_DIR} with a version-null manifest when it is missing")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.command == "round":
            from domainlm.rounds.daily import run_round

            result = run_round(
                deploy=not args.no_deploy,
                push=not args.no_push,
                host=args.host,
                ports=[int(p) for p in args.ports.split(",")],
            )
            print(json.dumps(result.as_dict(), ensure_ascii=False), flush=True)
            return result.exit_code
        if args.command == "promote":
            from domainlm.rounds.daily import decide_and_promote

            decision = decide_and_promote()
            print(json.dumps(decision.as_dict(), ensure_ascii=False), flush=True)
            return 2 if decision.action == "gate_failed" else 0
        if args.command == "serve":
            from domainlm.rounds.daily import serving_config
            from domainlm.rounds.server import deploy

            state = deploy(
                paths.DEPLOYED_DIR, serving_config(), host=args.host, ports=[int(p) for p in args.ports.split(",")]
            )
            print(json.dumps(state), flush=True)
            return 0
        if args.command == "stop":
            from domainlm.rounds.server import stop

            log.info("stopped server pid %s", stop())
            return 0
        from domainlm.rounds.promotion import write_bootstrap

        if not paths.DEPLOYED_DIR.exists():
            write_bootstrap(paths.DEPLOYED_DIR)
        return 0
    except Exception as exc:  # the scheduler sees exit 1 and this line; the traceback goes to the log
        log.exception("%s failed: %s", args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())

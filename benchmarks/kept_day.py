"""A day that keeps the deployed classifier, timed as one round, against the same day with nothing deployed, measured
in the same run.

The repository is a clone of this one at HEAD (its LM release, its LM and its classifier, which passes the gate on
the committed split), with its DVC cache hard-linked (nothing is rebuilt that the commit holds) and its own MLflow
store. The committed classifier is deployed with the round's own promote step. Then office_help becomes a declared
``type: jsonl`` source:

- **switch**: a round on the same documents minus a seeded ``--new-pages`` of office_help's pages. The split is
  sticky (LM release 1 holds every document), so the others keep their splits; the LM stages do not run.
- **kept day**: those pages arrive; one round. They take back their released splits, so the test split is the
  committed one and the deployed classifier is scored on exactly the documents it was promoted on. This is the day
  the bar is about: at most 180 s, plus 60 s per retry spent, with no LM stage.
- **fresh day** (the same-run baseline): the same drop from the switch's commit with nothing deployed, so the round
  trains a classifier from the merged LM, as every round did before the deployed model was scored first.

Per day (``benchmarks/results/kept_day.csv``): the columns of ``round_days.py`` (wall seconds of the whole round,
stages run, LM stages run, start case, attempts, decision, peak RSS, ...). ``kept_day.json`` adds the bar and the
kept day's wall time as a ratio of the fresh day's.

The pages that arrive were in LM release 1, so the deployed classifier trained on those in the train split; none is
in the test split it is scored on (the split is sticky). The figure is the cost of a day, not a quality claim.

Usage, from the repository root with a clean commit: ``python benchmarks/kept_day.py [--work DIR] [--keep]
[--new-pages 128]``. About 10 minutes on 2 idle cores. DVC's run-cache is cleared before the fresh day, so that it
runs every stage the kept day ran. The model server is not started (``round --no-deploy``) and
``dvc push`` goes to a local remote in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import measure  # noqa: E402
from round_days import (  # noqa: E402
    DAY2_BAR_S,
    DOMAIN,
    RETRY_ALLOWANCE_S,
    domain_records,
    read_domain_from,
    round_env,
    run_day,
    sh,
    write_part,
)

RESULTS = ROOT / "benchmarks" / "results"


def clone(work: Path, env: dict[str, str]) -> Path:
    """``work/repo``: a clone of HEAD with a hard-linked copy of this repository's DVC cache, a local remote, every
    output checked out and the committed classifier deployed (the round's promote step)."""
    repo = work / "repo"
    sh(["git", "clone", "-q", str(ROOT), str(repo)], work)
    for cmd in (
        ["git", "config", "user.email", "bench@example.com"],
        ["git", "config", "user.name", "bench"],
    ):
        sh(cmd, repo)
    shutil.copytree(ROOT / ".dvc" / "cache", work / "cache", copy_function=os.link)
    sh(["dvc", "cache", "dir", "--local", str(work / "cache")], repo)
    sh(["dvc", "remote", "add", "--local", "-d", "bench", str(work / "dvcstore")], repo)
    sh(["dvc", "checkout", "-q"], repo)
    promoted = subprocess.run(
        [sys.executable, "-m", "domainlm.rounds", "promote"], cwd=repo, capture_output=True, text=True, env=env
    )
    if promoted.returncode != 0 or '"promote"' not in promoted.stdout:
        raise RuntimeError(f"the committed classifier was not promoted:\n{(promoted.stdout + promoted.stderr)[-4000:]}")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "deploy the committed classifier"], repo)
    return repo


def as_jsonl_source(repo: Path, incoming: Path) -> None:
    """Read ``DOMAIN`` from the JSONL files in ``incoming`` (``round_days.read_domain_from``) and commit that."""
    read_domain_from(repo, incoming)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", f"{DOMAIN} from {incoming}"], repo)


def undeploy(repo: Path) -> None:
    """Put the bootstrap (nothing deployed) in ``models/deployed`` and commit it."""
    from domainlm.rounds.promotion import write_bootstrap

    shutil.rmtree(repo / "models" / "deployed")
    write_bootstrap(repo / "models" / "deployed")
    sh(["dvc", "add", "-q", "models/deployed"], repo)
    sh(["dvc", "commit", "-f", "-q", "train_classifier"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "nothing deployed"], repo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--new-pages", type=int, default=128, help="office_help pages that arrive on the kept day")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip():
        print("commit your changes first: the benchmark clones HEAD", file=sys.stderr)
        return 1

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    head = head.strip()
    work = args.work or Path(tempfile.mkdtemp(prefix="kept_day-"))
    work.mkdir(parents=True, exist_ok=True)
    incoming = work / "incoming" / DOMAIN
    incoming.mkdir(parents=True, exist_ok=True)
    records, order = domain_records(args.seed)
    new = sorted(order[: args.new_pages])
    known = sorted(order[args.new_pages :])
    env = round_env(work / "mlflow.db")
    rows = []
    try:
        repo = clone(work, env)
        write_part(incoming, 0, records, known)
        as_jsonl_source(repo, incoming)
        print(f"switch: {DOMAIN} as a JSONL source without {len(new)} of its pages", flush=True)
        rows.append({"day": "switch", "new_docs": 0, **run_day(repo, env, release=False)})
        print(json.dumps(rows[-1]), flush=True)
        switched = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        write_part(incoming, 1, records, new)
        print(f"kept day: {len(new)} {DOMAIN} pages arrive", flush=True)
        rows.append({"day": "kept", "new_docs": len(new), **run_day(repo, env, release=False)})
        print(json.dumps(rows[-1]), flush=True)
        sh(["git", "reset", "-q", "--hard", switched], repo)
        sh(["dvc", "checkout", "-q", "--force"], repo)
        undeploy(repo)
        # DVC's run-cache saw the kept day's stages with these very deps: it would restore their outputs instead of
        # running them, and the baseline would skip the data stages the kept day paid for
        shutil.rmtree(work / "cache" / "runs", ignore_errors=True)
        print(f"fresh day: the same {len(new)} pages with nothing deployed", flush=True)
        rows.append({"day": "fresh", "new_docs": len(new), **run_day(repo, env, release=False)})
        print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    kept, fresh = rows[1], rows[2]
    allowance = DAY2_BAR_S + RETRY_ALLOWANCE_S * kept["retries"]
    bars = {
        "kept_day_case": kept["start_case"],
        "kept_day_wall_s": kept["wall_s"],
        "kept_day_allowance_s": allowance,
        "within_allowance": kept["wall_s"] <= allowance,
        "lm_stages_run": kept["lm_stages_run"],
        "kept_to_fresh_wall": round(kept["wall_s"] / fresh["wall_s"], 3),
    }
    settings = {"domain": DOMAIN, "new_pages": len(new), "seed": args.seed, "pages": len(records)}
    # the code measured is the clone's HEAD, which had no uncommitted change when the run started
    measured = {"commit": head, "dirty": False}
    measure.write_csv(RESULTS / "kept_day.csv", rows, settings=settings, **measured)
    out = RESULTS / "kept_day.json"
    out.write_text(json.dumps({"rows": rows, "bars": bars, "settings": settings}, indent=2) + "\n", encoding="utf-8")
    measure.write_meta(out, settings=settings, **measured)
    print(json.dumps(bars, indent=2))
    ok = bars["within_allowance"] and not bars["lm_stages_run"] and kept["start_case"].startswith("deployed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

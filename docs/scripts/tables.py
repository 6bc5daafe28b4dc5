"""Markdown for the docs site and README.md, generated from the committed files: ``metrics/*.json`` (results),
``benchmarks/results/*`` (benchmark tables), ``params.yaml`` with ``dvc.yaml`` (configuration reference),
``domainlm.cli.help_pages()`` (command line) and ``dvc dag --mermaid`` (the pipeline's graph). No figure is typed
by hand: every page and README block is rebuilt from these files.

The functions return Markdown strings. ``docs/scripts/gen_pages.py`` (mkdocs-gen-files) writes the site's pages
with them; ``tests/test_docs.py`` loads this file by path. As a script::

    python docs/scripts/tables.py --print results      # results | benchmarks | configuration | cli | dag | readme
    python docs/scripts/tables.py --write-readme       # fill the generated blocks of README.md and docs/*.md
    python docs/scripts/tables.py --check-readme       # exit 1 when a block differs from what the files give

A generated block sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``; NAME is a
key of :data:`BLOCKS`.
"""

from __future__ import annotations

import argparse
import ast
import csv
import functools
import json
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS = "metrics"
RESULTS = "benchmarks/results"
META_SUFFIX = ".meta.json"
RESULT_SUFFIXES = (".csv", ".json", ".jsonl")
# Wide result tables whose first columns are not the telling ones: the columns their section shows.
SHOWN_COLUMNS = {
    "dedup_scale.csv": [
        "docs", "method", "wall_s", "docs_per_s", "peak_rss_mb", "bands", "rows", "candidate_pairs",
        "verified_pairs", "truth_pairs", "recall", "precision",
    ],
    "real_shape.csv": [
        "row", "case", "stage", "dtype", "trainable_params", "s_per_step", "tokens_per_s", "peak_rss_train_mb",
        "peak_rss_process_mb", "est_total_mb", "peak_over_estimate", "wall_s",
    ],
}  # fmt: skip
RATIO_RE = re.compile(r"(?:^|_)(?:ratio|speedup)(?:_|$)")
HARDWARE_NOT_RECORDED = "not recorded"
MAX_COLUMNS = 12  # wider result tables show a subset and link the full file
MAX_CELL_CHARS = 60
NOT_A_DVC_PARAM = "not a DVC param dependency"
BLOCK_RE = re.compile(
    r"(?P<begin><!-- BEGIN generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<end><!-- END generated: (?P=name) -->)",
    re.DOTALL,
)


# --------------------------------------------------------------------------------------------------- helpers


def git(*args: str) -> str:
    """Output of ``git <args>`` run in the repository root, stripped; ``""`` when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def git_stamp(path: str | Path) -> tuple[str, str]:
    """``(short commit, commit date YYYY-MM-DD)`` of the last commit that changed ``path`` (relative to the
    repository root); ``("not committed", "not committed")`` when no commit has it."""
    out = git("log", "-1", "--format=%h %cs", "--", str(path))
    if not out:
        return "not committed", "not committed"
    commit, date = out.split()
    return commit, date


def md(text: Any) -> str:
    """``text`` made safe for a Markdown table cell or a line of prose: pipes, asterisks, underscores and ``<``
    escaped, newlines joined."""
    s = re.sub(r"\s+", " ", str(text))
    for ch in ("\\", "|", "*", "_"):
        s = s.replace(ch, "\\" + ch)
    return s.replace("<", "&lt;")


def prose(text: Any) -> str:
    """Like :func:`md`, but text inside backtick code spans is kept as written."""
    parts = re.split(r"(`[^`]+`)", " ".join(str(text).split()))
    return "".join(p.replace("|", "¦") if p.startswith("`") and p.endswith("`") else md(p) for p in parts)


def code(text: Any) -> str:
    """``text`` as an inline code span (a pipe in it cannot break a table: it becomes ``¦``)."""
    s = " ".join(str(text).split()).replace("|", "¦")
    tick = "``" if "`" in s else "`"
    return f"{tick}{s}{tick}" if s else ""


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown pipe table. ``header`` and the cells are written as given (escape them first with :func:`md`
    or :func:`code`); ``align`` holds ``"l"`` or ``"r"`` per column (default left)."""
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: Any, digits: int = 3) -> str:
    """A number for prose: ``digits`` decimals for floats, thousands separators for integers, ``—`` for None."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def signed(x: float, digits: int = 3) -> str:
    """``x`` with its sign (``+0.012``, ``−0.016``)."""
    return f"{x:+.{digits}f}".replace("-", "−")


def cell_value(raw: Any) -> str:
    """A result-table cell: floats to 4 significant digits (integers as written), long text cut, escaped."""
    if raw is None:
        return ""
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, Mapping):
        return code(", ".join(f"{k}={json.dumps(v)}" for k, v in flatten(raw).items())) or "{}"
    s = str(raw) if not isinstance(raw, list) else json.dumps(raw, ensure_ascii=False)
    if re.fullmatch(r"-?\d+", s):
        return s
    try:
        x = float(s)
    except ValueError:
        if len(s) > MAX_CELL_CHARS:
            s = s[: MAX_CELL_CHARS - 1] + "…"
        return md(s)
    if math.isnan(x) or math.isinf(x):
        return s
    return f"{x:.4g}" if abs(x) < 1e3 else f"{x:.0f}"


def load_json(rel: str | Path) -> dict[str, Any]:
    """``ROOT / rel`` parsed as JSON."""
    return json.loads((ROOT / rel).read_text(encoding="utf-8"))


def rst_to_md(text: str) -> str:
    """A docstring paragraph in Markdown: Sphinx roles (``:mod:`x```) and double backticks become code spans,
    lines are joined."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"`\1`", text)
    return " ".join(text.replace("``", "`").split())


# --------------------------------------------------------------------------------------------------- DVC


@functools.cache
def dvc_stages() -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]:
    """The pipeline's stages as DVC resolves ``dvc.yaml`` (foreach expanded): ``(name, params, metrics)`` with
    ``params`` the ``params.yaml`` keys the stage lists and ``metrics`` its metrics files or folders (relative
    paths). ``.dvc`` files are left out."""
    from dvc.repo import Repo

    stages = []
    with warnings.catch_warnings(), Repo(str(ROOT)) as repo:
        warnings.simplefilter("ignore", DeprecationWarning)  # pygtrie's, raised inside DVC
        for st in repo.index.stages:
            if st.addressing.endswith(".dvc"):
                continue
            params: list[str] = []
            for dep in st.deps:
                if dep.__class__.__name__ == "ParamsDependency" and Path(str(dep.def_path)).name == "params.yaml":
                    params += list(dep.params)
            metrics = [str(o.def_path) for o in st.outs if o.metric]
            stages.append((st.addressing, tuple(params), tuple(metrics)))
    return tuple(stages)


def stage_group(name: str) -> str:
    """The stage name a foreach/matrix stage was written as in ``dvc.yaml``: ``train_lora@law`` → ``train_lora``."""
    return name.split("@", 1)[0]


def dag_mermaid() -> str:
    """The pipeline's graph as ``dvc dag --mermaid`` prints it (a mermaid ``flowchart``), without a trailing
    newline. Raises ``RuntimeError`` with DVC's message when the command fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--mermaid"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0 or "flowchart" not in proc.stdout:
        raise RuntimeError(f"dvc dag --mermaid failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.rstrip()


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _node_id(name: str) -> str:
    return re.sub(r"\W", "_", name.removesuffix(".dvc"))


def dag_flowchart() -> str:
    """The pipeline's graph as a mermaid ``flowchart`` built from DVC's index of ``dvc.yaml`` (the same stages and
    edges as ``dvc dag``): a stage is a box; an input tracked with ``dvc add`` (a ``.dvc`` file) is a cylinder
    labelled with its path; an edge is solid when it carries data or models and dotted when every output it
    carries is a metrics file or a plot (declared ``metrics``/``plots``, or under ``metrics/`` or ``plots/``)."""
    from dvc.repo import Repo

    with warnings.catch_warnings(), Repo(str(ROOT)) as repo:
        warnings.simplefilter("ignore", DeprecationWarning)  # pygtrie's, raised inside DVC
        stages = sorted(repo.index.stages, key=lambda st: not st.addressing.endswith(".dvc"))  # inputs first
        order = {st.addressing: i for i, st in enumerate(stages)}
        lines = ["flowchart TD"]
        for st in stages:
            if st.addressing.endswith(".dvc"):
                label = Path(str(st.outs[0].fs_path)).relative_to(ROOT) if st.outs else st.addressing
                lines.append(f"    {_node_id(st.addressing)}[({label})]")
            else:
                lines.append(f'    {_node_id(st.addressing)}["{st.addressing}"]')
        edges = []
        for down, up in repo.index.graph.edges:
            deps = [str(d.fs_path) for d in down.deps if d.__class__.__name__ != "ParamsDependency"]
            carried = [o for o in up.outs if any(_overlaps(str(o.fs_path), d) for d in deps)]
            light = bool(carried) and all(
                o.metric or o.plot or str(o.def_path).startswith(("metrics/", "plots/")) for o in carried
            )
            edges.append((order[up.addressing], order[down.addressing], up.addressing, down.addressing, light))
    for _, _, up, down, light in sorted(edges):
        lines.append(f"    {_node_id(up)} {'-.->' if light else '-->'} {_node_id(down)}")
    return "\n".join(lines)


def dag_block() -> str:
    """:func:`dag_flowchart` in a fenced ``mermaid`` block."""
    return f"```mermaid\n{dag_flowchart()}\n```"


# --------------------------------------------------------------------------------------------------- results


def metrics_stamp() -> str:
    """Where the results come from: the last commit that changed ``metrics/`` and its date, with a note when the
    working tree's ``metrics/`` differs from it."""
    commit, date = git_stamp(METRICS)
    dirty = git("status", "--porcelain", "--", METRICS)
    note = " (the working tree's `metrics/` has uncommitted changes)" if dirty else ""
    return f"`metrics/` at commit `{commit}` ({date}){note}"


def stage_costs() -> list[tuple[str, float, float, str]]:
    """``(stage, wall_s, peak_rss_mb, source)`` per DVC stage whose metrics carry ``stage.wall_s`` and
    ``stage.peak_rss_mb`` (the stage contract, ``domainlm/common/stage.py``): seconds from start to the last
    metrics write, and the process's peak RSS in MiB. A stage with several metrics files (a folder) reports the
    largest of each."""
    rows = []
    for name, _, metric_paths in dvc_stages():
        files: list[Path] = []
        for rel in metric_paths:
            p = ROOT / rel
            files += sorted(p.glob("*.json")) if p.is_dir() else ([p] if p.suffix == ".json" and p.exists() else [])
        walls, peaks = [], []
        for f in files:
            st = json.loads(f.read_text(encoding="utf-8")).get("stage")
            if isinstance(st, dict) and "wall_s" in st and "peak_rss_mb" in st:
                walls.append(float(st["wall_s"]))
                peaks.append(float(st["peak_rss_mb"]))
        if walls:
            rows.append((name, max(walls), max(peaks), ", ".join(f"`{f.relative_to(ROOT)}`" for f in files)))
    return rows


def _classifier() -> dict[str, Any]:
    c = load_json(f"{METRICS}/classifier.json")
    boot = c.get("bootstrap", {})
    gate = c["gate"]
    return {
        "lora": (c["lora"]["macro_f1"], c["lora"]["macro_f1_low"], c["lora"]["macro_f1_high"]),
        "baseline": (c["baseline"]["macro_f1"], c["baseline"]["macro_f1_low"], c["baseline"]["macro_f1_high"]),
        "diff": tuple(
            c["lora_to_baseline"][k]
            for k in ("macro_f1_difference", "macro_f1_difference_low", "macro_f1_difference_high")
        ),
        "interval": f"{boot.get('confidence', 0.95):.0%} {boot.get('method', 'bootstrap')} interval, "
        f"{boot.get('resamples', '?')} paired bootstrap resamples of the {c['docs']['test']} test documents",
        "gate": gate,
        "test_docs": c["docs"]["test"],
        "classes": c["classes"],
    }


def _ci(t: tuple[float, float, float], sign: bool = False) -> str:
    f = signed if sign else num
    return f"{f(t[0])} [{f(t[1])}, {f(t[2])}]"


def _gate_line(gate: Mapping[str, Any]) -> str:
    verdict = "passed" if gate["passed"] else "failed"
    tries = ", ".join(f"{num(v)}" for _, v in sorted(gate.get("test_macro_f1", {}).items()))
    return (
        f"{verdict} (test macro-F1 ≥ {num(gate['min_f1'], 2)}) after {gate['attempts']} of at most "
        f"{gate['max_retries'] + 1} attempts; test macro-F1 per attempt: {tries}"
    )


def results_markdown() -> str:
    """The results page: the classifier's test macro-F1 with its bootstrap interval against the TF-IDF baseline and
    the quality gate, the merged LM's perplexity, BLEU, chrF and ROUGE-L per domain and its gate, the data funnel
    (validate, dedup, split), label refinement, and time and memory per stage, each figure with the file it comes
    from. Raises ``FileNotFoundError``/``KeyError`` when a metrics file or key is missing."""
    cl = _classifier()
    ev = load_json(f"{METRICS}/evaluate.json")
    alerts = load_json(f"{METRICS}/alerts.json")
    va = load_json(f"{METRICS}/validate.json")
    dd = load_json(f"{METRICS}/dedup.json")
    sp = load_json(f"{METRICS}/split.json")
    rf = load_json(f"{METRICS}/refine.json")
    out = [
        "# Results",
        "",
        "Every figure on this page is read from the pipeline's metrics files when the site is built "
        f"(`docs/scripts/tables.py`): {metrics_stamp()}. Run `dvc repro` and rebuild the site to refresh them; "
        "`dvc metrics show` prints the same files.",
        "",
        "## Document classifier",
        "",
        f"LoRA sequence classification on the merged LM against a char n-gram TF-IDF + logistic regression baseline, "
        f"{cl['classes']} classes, scored on the test split's source labels. Intervals: {cl['interval']}. "
        "Source: `metrics/classifier.json`.",
        "",
        table(
            ["Figure", "Value"],
            [
                ["LoRA classifier, test macro-F1", _ci(cl["lora"])],
                ["TF-IDF baseline, test macro-F1", _ci(cl["baseline"])],
                ["Difference (LoRA − baseline)", _ci(cl["diff"], sign=True)],
                ["Quality gate (`classifier.gate`)", md(_gate_line(cl["gate"]))],
            ],
        ),
        "",
        "The difference's interval contains 0: at this confidence, the test split does not tell the LoRA "
        "classifier and the baseline apart."
        if cl["diff"][1] <= 0 <= cl["diff"][2]
        else "The difference's interval excludes 0.",
        "",
        "## Merged language model",
        "",
        f"Test-split perplexity (sliding windows of {ev['settings']['max_length']} tokens, stride "
        f"{ev['settings']['stride']}) of the base model, each domain's expert (base + its LoRA) and the merged model; "
        f"BLEU, chrF and ROUGE-L of {ev['settings']['new_tokens']}-token continuations of "
        f"{ev['settings']['prompt_tokens']}-token prompts against the documents' own next tokens, base → merged. "
        "Source: `metrics/evaluate.json`.",
        "",
    ]
    domains = list(ev["perplexity"]["merged"])
    rows = []
    for d in domains:
        ppl = ev["perplexity"]
        rows.append(
            [
                code(d),
                num(ppl["base"][d], 1),
                num(ppl[f"expert_{d}"][d], 1) if f"expert_{d}" in ppl else "—",
                num(ppl["merged"][d], 1),
                num(ev["retained_gain"][d], 3),
                f"{num(ev['bleu']['base'][d], 2)} → {num(ev['bleu']['merged'][d], 2)}",
                f"{num(ev['chrf']['base'][d], 2)} → {num(ev['chrf']['merged'][d], 2)}",
                f"{num(ev['rougeL']['base'][d], 3)} → {num(ev['rougeL']['merged'][d], 3)}",
            ]
        )
    out += [
        table(
            [
                "Domain",
                "Perplexity, base",
                "Perplexity, expert",
                "Perplexity, merged",
                "Retained gain",
                "BLEU",
                "chrF",
                "ROUGE-L",
            ],
            rows,
            ["l", "r", "r", "r", "r", "r", "r", "r"],
        ),
        "",
        "Retained gain: (base − merged) / (base − expert) perplexity on the domain, the share of the expert's gain "
        "that the merged model keeps (1 = all of it; above 1, the merged model beats the expert). "
        f"Mean retained gain {num(ev['mean_retained_gain'])}. Quality gate (`evaluate.gate`, thresholds in "
        f"`metrics/alerts.json`): {'passed' if ev['gate']['passed'] else 'failed'}, "
        f"{ev['gate']['n_failures']} failed checks; "
        + ", ".join(f"{code(k)} = {code(json.dumps(v))}" for k, v in alerts.get("thresholds", {}).items())
        + ".",
        "",
        "## Data",
        "",
        table(
            ["Step", "Figures", "Source"],
            [
                [
                    "Validation",
                    f"{num(va['totals']['lines_read'])} lines read, {num(va['totals']['kept'])} kept, "
                    f"{num(va['totals']['rejected'])} rejected ("
                    + ", ".join(f"{code(k)} {v}" for k, v in va["by_reason"].items() if v)
                    + ")",
                    "`metrics/validate.json`",
                ],
                [
                    "Deduplication (MinHash LSH)",
                    f"{num(dd['totals']['before'])} documents in, {num(dd['totals']['after'])} kept, "
                    f"{num(dd['totals']['before'] - dd['totals']['after'])} removed "
                    f"({num(dd['totals']['near_removed'])} near-duplicates, {num(dd['totals']['exact_removed'])} "
                    f"exact; {dd['totals']['removed_rate']:.2%}); {dd['bands']} bands × {dd['rows']} rows",
                    "`metrics/dedup.json`",
                ],
                [
                    "Stratified split",
                    " / ".join(f"{k} {num(v)}" for k, v in sp["total"].items())
                    + f"; {num(sp['overrides']['applied'])} label overrides applied",
                    "`metrics/split.json`",
                ],
                [
                    "Label refinement",
                    f"{num(rf['labels_changed'])} of {num(rf['rows'])} labels changed ({rf['label_change_rate']:.2%}) "
                    f"in {rf['iterations']} iterations; {num(rf['review_queue_rows'])} rows in the review queue",
                    "`metrics/refine.json`",
                ],
            ],
        ),
        "",
        "## Time and memory per stage",
        "",
        "Wall seconds and peak resident memory (MiB) of each stage's process, from `stage.wall_s` and "
        "`stage.peak_rss_mb` in its metrics files. The total is the sum of the stages' times, run one after "
        "another; the peak is the largest single stage.",
        "",
    ]
    costs = stage_costs()
    out += [
        table(
            ["Stage", "Wall s", "Peak RSS MiB", "Source"],
            [[code(n), f"{w:.1f}", f"{p:.0f}", src] for n, w, p, src in costs]
            + [["**total**", f"**{sum(c[1] for c in costs):.1f}**", f"**{max(c[2] for c in costs):.0f}**", ""]],
            ["l", "r", "r", "l"],
        ),
        "",
    ]
    return "\n".join(out)


def readme_results_markdown() -> str:
    """The README's short results table (at most 15 lines): the classifier against its baseline, the merged LM's
    perplexity and gate, dedup, refinement and the whole pipeline's time. No commit hash, so that committing new
    metrics and the README together keeps the block equal to what the files give."""
    cl = _classifier()
    ev = load_json(f"{METRICS}/evaluate.json")
    dd = load_json(f"{METRICS}/dedup.json")
    rf = load_json(f"{METRICS}/refine.json")
    costs = stage_costs()
    domains = list(ev["perplexity"]["merged"])
    ppl = " / ".join(num(ev["perplexity"]["merged"][d], 0) for d in domains)
    base = " / ".join(num(ev["perplexity"]["base"][d], 0) for d in domains)
    gate = cl["gate"]
    rows = [
        ["Classifier test macro-F1 (LoRA)", _ci(cl["lora"]), "`metrics/classifier.json`"],
        ["TF-IDF baseline test macro-F1", _ci(cl["baseline"]), "`metrics/classifier.json`"],
        ["LoRA − baseline", _ci(cl["diff"], sign=True), "`metrics/classifier.json`"],
        [
            f"Classifier gate (macro-F1 ≥ {num(gate['min_f1'], 2)})",
            f"{'passed' if gate['passed'] else 'failed'} on attempt {gate['attempts']} "
            f"(of at most {gate['max_retries'] + 1})",
            "`metrics/classifier.json`",
        ],
        [
            "Merged LM perplexity, " + " / ".join(md(d) for d in domains),
            f"{ppl} (base {base})",
            "`metrics/evaluate.json`",
        ],
        [
            "Mean retained gain (LM gate)",
            f"{num(ev['mean_retained_gain'], 2)} ({'passed' if ev['gate']['passed'] else 'failed'})",
            "`metrics/evaluate.json`",
        ],
        [
            "Dedup: in / kept / removed",
            f"{num(dd['totals']['before'])} / {num(dd['totals']['after'])} / "
            f"{num(dd['totals']['before'] - dd['totals']['after'])}",
            "`metrics/dedup.json`",
        ],
        [
            "Labels changed by refinement",
            f"{num(rf['labels_changed'])} ({rf['label_change_rate']:.1%})",
            "`metrics/refine.json`",
        ],
        [
            "Pipeline time, peak memory",
            f"{sum(c[1] for c in costs):.0f} s over {len(costs)} stages, {max(c[2] for c in costs):.0f} MiB",
            "`stage` in `metrics/**/*.json`",
        ],
    ]
    return "\n".join(
        [
            table(["Result", "Value", "Source"], rows),
            "",
            f"Brackets: {cl['interval']}.",
        ]
    )


# --------------------------------------------------------------------------------------------------- benchmarks


def result_files() -> list[Path]:
    """Every result file under ``benchmarks/results/`` (CSV, JSON, JSONL; the ``.meta.json`` sidecars left out),
    sorted by name."""
    folder = ROOT / RESULTS
    return sorted(p for p in folder.iterdir() if p.suffix in RESULT_SUFFIXES and not p.name.endswith(META_SUFFIX))


def benchmark_script(name: str) -> Path | None:
    """The script that writes result file ``name``: ``benchmarks/<stem>.py`` with the longest stem that the file's
    stem starts with (``label_noise_seed1.csv`` → ``label_noise.py``); None when there is none."""
    stem = Path(name).name.split(".")[0]
    best = None
    for script in (ROOT / "benchmarks").glob("*.py"):
        s = script.stem
        if (stem == s or stem.startswith(s + "_")) and (best is None or len(s) > len(best.stem)):
            best = script
    return best


def script_summary(script: Path) -> str:
    """The first paragraph of ``script``'s module docstring, in Markdown; ``""`` without a docstring."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    return rst_to_md(doc.strip().split("\n\n")[0]) if doc.strip() else ""


def result_rows(path: str | Path, missing: str | None = None) -> tuple[list[dict[str, str]], dict[str, Any], str]:
    """A benchmark CSV's rows (as strings), its :func:`result_meta`, and ``" with uncommitted changes"`` or ``""``
    for the sentence that names the measurement.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message is ``"<path> is missing: <missing>"`` when given.
    """
    path = Path(path)
    if missing is not None and not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {missing}")
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    meta = result_meta(path)
    return rows, meta, " with uncommitted changes" if meta["dirty"] else ""


def result_meta(path: Path) -> dict[str, Any]:
    """Hardware, commit and date of result file ``path``: its sidecar ``<path>.meta.json`` (written by
    ``benchmarks/measure.py``'s ``write_meta``) when present, else the commit and date of the last git commit that
    changed the file and hardware ``"not recorded"``. Keys: ``hardware``, ``commit``, ``date``, ``dirty``,
    ``source``."""
    sidecar = path.with_name(path.name + META_SUFFIX)
    if sidecar.exists():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        return {
            "hardware": meta.get("hardware") or HARDWARE_NOT_RECORDED,
            "commit": meta.get("commit") or "not recorded",
            "date": meta.get("date") or "not recorded",
            "dirty": bool(meta.get("dirty")),
            "source": f"`{sidecar.relative_to(ROOT) if sidecar.is_relative_to(ROOT) else sidecar}`"
            + (f": {prose(meta['recorded_from'])}" if meta.get("recorded_from") else ""),
            "extra": {k: v for k, v in meta.items() if k in ("python", "torch")},
        }
    commit, date = git_stamp(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else ("not recorded",) * 2
    return {
        "hardware": HARDWARE_NOT_RECORDED,
        "commit": commit,
        "date": date,
        "dirty": False,
        "source": "git log of the file",
        "extra": {},
    }


def _ratio_baselines(columns: Sequence[str]) -> list[str]:
    """What ratio columns compare against, from their names (``speedup_vs_fp32_1thread`` → ``fp32_1thread``)."""
    found = []
    for c in columns:
        m = re.search(r"(?:ratio|speedup)\w*?_(?:vs|over)_(\w+)$", c)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found


def _records(path: Path) -> tuple[list[str], list[dict[str, Any]]] | None:
    """A result file as ``(columns, rows)`` when it is a table (CSV, JSONL, or JSON with a list of records under a
    top-level key); None for a JSON document without one."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        return cols, rows
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _wide_subset(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], chosen: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """``(shown, constant)``: the columns to show and those with one value in every row (stated in the caption).
    ``chosen`` (from :data:`SHOWN_COLUMNS`) picks the shown ones; otherwise more than :data:`MAX_COLUMNS` varying
    columns keep the first two, the ratio columns, then the rest in order."""
    constant = [c for c in columns if len(rows) > 1 and len({str(r.get(c, "")) for r in rows}) == 1]
    varying = [c for c in columns if c not in constant]
    if chosen:
        return [c for c in chosen if c in varying], constant
    if len(varying) <= MAX_COLUMNS:
        return varying, constant
    keep = varying[:2] + [c for c in varying if RATIO_RE.search(c) and c not in varying[:2]]
    for c in varying:
        if len(keep) >= MAX_COLUMNS:
            break
        if c not in keep:
            keep.append(c)
    return [c for c in varying if c in keep][:MAX_COLUMNS], constant


def section_id(name: str) -> str:
    """The anchor of result file ``name``'s section on the benchmarks page."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower())


def _table_of(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], full_link: str, chosen: Sequence[str] | None = None
) -> list[str]:
    shown, constant = _wide_subset(columns, rows, chosen)
    out = []
    if constant:
        out += [
            "Same in every row: " + ", ".join(f"{code(c)} = {cell_value(rows[0].get(c))}" for c in constant) + ".",
            "",
        ]
    numeric = [all(r.get(c) in (None, "") or _is_float(r.get(c)) for r in rows) for c in shown]
    out.append(
        table(
            [md(c) for c in shown],
            [[cell_value(r.get(c)) for c in shown] for r in rows],
            ["r" if n else "l" for n in numeric],
        )
    )
    hidden = [c for c in columns if c not in shown and c not in constant]
    if hidden:
        more, verb = (f"{len(hidden)} more columns", "are") if len(hidden) > 1 else ("1 more column", "is")
        out += ["", f"{more} ({', '.join(code(c) for c in hidden)}) {verb} in {full_link}."]
    return out


def benchmark_markdown(name: str) -> str:
    """The benchmarks page's section for result file ``name`` (a file name under ``benchmarks/results/``): what the
    benchmark measures (the first paragraph of its script's docstring), the baseline of its ratio columns, the
    hardware, commit and date of the measurement (:func:`result_meta`), then its table (CSV, JSONL) or its figures
    (JSON, flattened to dotted keys), with a link to the full file. Raises ``FileNotFoundError`` for an unknown
    file."""
    path = ROOT / RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(path)
    script = benchmark_script(name)
    meta = result_meta(path)
    link = f"[the full file](benchmark-results/{name})"
    out = [f"## {name} {{ #{section_id(name)} }}", ""]
    if script is not None:
        summary = script_summary(script)
        out += [f"**What it measures** (`benchmarks/{script.name}`): {summary or 'no module docstring.'}", ""]
    else:
        out += ["**What it measures:** no benchmark script with this name prefix under `benchmarks/`.", ""]
    records = _records(path)
    if records is not None:
        columns, rows = records
        baselines = _ratio_baselines(columns)
        if baselines:
            ratio_cols = [c for c in columns if RATIO_RE.search(c)]
            label = next((c for c in columns if any(r.get(c) and not _is_float(r.get(c)) for r in rows)), columns[0])
            ones = [
                str(r.get(label))
                for r in rows
                if [r.get(c) for c in ratio_cols if _is_float(r.get(c))]
                and all(float(r[c]) == 1.0 for c in ratio_cols if _is_float(r.get(c)))
            ]
            ones = list(dict.fromkeys(ones))
            out += [
                "**Baseline:** the ratio columns ("
                + ", ".join(code(c) for c in ratio_cols)
                + ") divide each row by "
                + ", ".join(f"**{md(b)}**" for b in baselines)
                + (
                    f" (ratio 1 in the row{'s' if len(ones) > 1 else ''} {', '.join(code(o) for o in ones)})"
                    if ones
                    else ""
                )
                + ".",
                "",
            ]
    dirty = " (with uncommitted changes)" if meta["dirty"] else ""
    extra = "".join(f", {k} {v}" for k, v in meta["extra"].items())
    out += [
        f"**Hardware:** {md(meta['hardware'])}{md(extra)}. **Commit:** `{meta['commit']}`{dirty}. "
        f"**Date:** {meta['date']}. (From {meta['source']}.)",
        "",
    ]
    if records is not None:
        columns, rows = records
        out += _table_of(columns, rows, link, SHOWN_COLUMNS.get(name))
    else:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out += _json_tables(doc, link)
    out += ["", f"Full data: {link}.", ""]
    return "\n".join(out)


def _is_float(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def _json_tables(doc: Any, link: str) -> list[str]:
    """A JSON result: each list of records as a table, every other figure as a ``key | value`` table."""
    scalars: dict[str, Any] = {}
    lists: list[tuple[str, list[dict[str, Any]]]] = []

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, Mapping):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, list) and d and all(isinstance(x, Mapping) for x in d):
            lists.append((prefix[:-1], [flatten(x) for x in d]))
        else:
            scalars[prefix[:-1]] = d

    walk(doc, "")
    out: list[str] = []
    for key, rows in lists:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        out += [f"`{key}`:", ""] + _table_of(cols, rows, link) + [""]
    if scalars:
        body = table(["Key", "Value"], [[code(k), cell_value(v)] for k, v in scalars.items()])
        if len(scalars) > 15:  # a collapsed block (pymdownx.details)
            body = f'??? info "{len(scalars)} figures"\n\n' + "\n".join("    " + line for line in body.splitlines())
        out.append(body)
    return out


def benchmarks_markdown() -> str:
    """The benchmarks page: an introduction, a table of contents and one :func:`benchmark_markdown` section per
    result file."""
    files = result_files()
    toc = []
    for p in files:
        script = benchmark_script(p.name)
        toc.append(f"- [{p.name}](#{section_id(p.name)})" + (f" — `benchmarks/{script.name}`" if script else ""))
    intro = [
        "# Benchmarks",
        "",
        "What each script under `benchmarks/` measured, with the committed result files in `benchmarks/results/` as "
        "tables. Each section says what the benchmark measures (the script's docstring), the baseline its ratio "
        "columns compare against, and the hardware, commit and date of the measurement: from the result's "
        "`.meta.json` sidecar, which `benchmarks/measure.py` writes next to every result it saves, or else from the "
        "last commit that changed the file (hardware then not recorded). Run a benchmark with "
        "`python benchmarks/<name>.py` on an idle machine; `make bench` runs the I/O one.",
        "",
        "Timings depend on the CPU, its bf16 support (AVX512-BF16, AMX) and on how busy the machine was: compare "
        "rows of one table, not figures across machines.",
        "",
        "## Contents",
        "",
        *toc,
        "",
    ]
    return "\n".join(intro + [benchmark_markdown(p.name) for p in files])


# --------------------------------------------------------------------------------------------------- params.yaml


_KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_\-]+):(?P<rest>.*)$")


def _split_comment(rest: str) -> tuple[str, str | None, int]:
    """``rest`` of a YAML line split into ``(value, comment or None, offset of '#' in rest)``; a ``#`` inside
    quotes or not preceded by whitespace is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1 :].strip(), i
    return rest.strip(), None, -1


def params_comments(path: str | Path = ROOT / "params.yaml") -> dict[str, str]:
    """The comments of ``params.yaml``, keyed by dotted path (PyYAML drops them). A key gets:

    - the comment lines directly above it at its own indentation;
    - its inline ``# ...`` and the comment-only lines below it that continue at the same column;
    - for a key that opens a block (no value on its line), the comment lines directly below it (a section's
      description);
    - a comment block indented deeper than the key that follows it belongs to the block above (e.g. notes
      after a mapping's last entry), and is added to that block's key.
    """
    comments: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []  # (indent, dotted path) of the open keys
    pending: list[str] = []
    pending_col = -1
    cont_key: str | None = None
    cont_col = -1
    opened: str | None = None  # a key with no value on its line, directly above

    def add(key: str, lines: Iterable[str]) -> None:
        comments.setdefault(key, []).extend(lines)

    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            if pending and opened:
                add(opened, pending)
            pending, pending_col, cont_key, opened = [], -1, None, None
            continue
        if stripped.startswith("#"):
            col = len(line) - len(line.lstrip())
            text = stripped.lstrip("#").strip()
            if re.fullmatch(r"[\w-]+: [\{\[].*[\}\]]", text):  # a commented-out example entry
                text = f"(e.g. `{text}`)"
            if cont_key is not None and not pending and col >= cont_col - 2 and col > 0:
                add(cont_key, [text])
            else:
                cont_key = None
                if pending and col != pending_col:
                    pending = []
                pending.append(text)
                pending_col = col
            continue
        m = _KEY_RE.match(line)
        if not m:  # a block list item or a continued flow value: comments so far stay unattached
            pending, cont_key, opened = [], None, None
            continue
        indent = len(m.group("indent"))
        if pending:
            if opened is not None:
                add(opened, pending)
            elif pending_col == indent:
                pass  # attached below, once the key's path is known
            else:
                owner = [p for i, p in stack if i < pending_col]
                if owner:
                    add(owner[-1], pending)
                pending = []
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = f"{stack[-1][1]}.{m.group('key')}" if stack else m.group("key")
        stack.append((indent, key))
        if pending and opened is None:
            add(key, pending)
        pending, pending_col = [], -1
        value, comment, offset = _split_comment(m.group("rest"))
        if comment is not None:
            add(key, [comment])
            cont_key, cont_col = key, indent + len(m.group("key")) + 1 + offset
        else:
            cont_key = None
        opened = key if not value else None
    return {k: " ".join(v) for k, v in comments.items()}


def param_keys(params: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Every key of ``params`` as ``(dotted path, value)``, parents before their children, in file order."""
    out = []
    for k, v in params.items():
        key = f"{prefix}{k}"
        out.append((key, v))
        if isinstance(v, Mapping):
            out += param_keys(v, key + ".")
    return out


def leaf_keys(params: Mapping[str, Any]) -> list[str]:
    """The dotted paths of ``params``' leaves (values that are not a non-empty mapping)."""
    return [k for k, v in param_keys(params) if not (isinstance(v, Mapping) and v)]


def readers(key: str, is_section: bool = False) -> list[str]:
    """The DVC stages that list ``key`` in their ``params:`` (directly or through a listed parent), by their
    ``dvc.yaml`` names (a foreach stage once). With ``is_section``, also stages that list part of its subtree."""
    found: list[str] = []
    for name, params, _ in dvc_stages():
        for p in params:
            if key == p or key.startswith(p + ".") or (is_section and p.startswith(key + ".")):
                group = stage_group(name)
                if group not in found:
                    found.append(group)
                break
    return found


def code_readers(key: str) -> list[str]:
    """Modules under ``domainlm/`` and ``stages/`` that name ``key``'s last part as a string (``"name"`` or
    ``'name'``): who reads a key that no stage lists."""
    leaf = key.rsplit(".", 1)[-1]
    pat = re.compile(rf"""["']{re.escape(leaf)}["']""")
    hits = []
    for folder in ("domainlm", "stages"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            if pat.search(f.read_text(encoding="utf-8")):
                hits.append(str(f.relative_to(ROOT)))
    return hits


def yaml_value(v: Any) -> str:
    """A params value as YAML flow text (``null``, ``true``, ``[q_proj, k_proj]``, ``0.0005``)."""
    if isinstance(v, Mapping) and v:
        return ""
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def configuration_markdown(path: str | Path = ROOT / "params.yaml") -> str:
    """The configuration reference: one table per top-level section of ``params.yaml`` with every key (dotted),
    its default, the stages that read it (from ``dvc.yaml``'s ``params:`` lists) and its comment."""
    params = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    notes = params_comments(path)
    out = [
        "# Configuration (`params.yaml`)",
        "",
        "Every key of `params.yaml`, generated from the file itself when the site is built: the default is the "
        "committed value, the description is the key's comment, and *Read by* lists the DVC stages whose "
        "`params:` in `dvc.yaml` name the key or a section above it, so a change to the key re-runs exactly those "
        "stages (and what depends on them). Override a key for one run with "
        "`dvc exp run -S 'section.key=value'`.",
        "",
    ]
    for top, value in params.items():
        out += [f"## `{top}`", ""]
        if notes.get(top) and isinstance(value, Mapping):
            out += [prose(notes[top]), ""]
        rows = []
        for key, v in param_keys({top: value}):
            section = isinstance(v, Mapping) and bool(v)
            if key == top and section:
                continue
            who = readers(key, is_section=section)
            if who:
                read_by = ", ".join(code(s) for s in who)
            else:
                users = code_readers(key)
                read_by = NOT_A_DVC_PARAM + ("; named in " + ", ".join(code(u) for u in users) if users else "")
            default = "*section*" if section else code(yaml_value(v))
            rows.append([code(key), default, read_by, prose(notes.get(key, ""))])
        out += [table(["Key", "Default", "Read by", "Description"], rows), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- CLI


def help_pages() -> list[tuple[str, str]]:
    """``domainlm.cli.help_pages()``: ``(command, help text)`` pairs, the repository root put on ``sys.path``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from domainlm.cli import help_pages as pages

    return list(pages())


def cli_markdown() -> str:
    """The command-line reference: a section per command of the ``domainlm`` console script, with its ``--help``
    text."""
    out = [
        "# Command line",
        "",
        "The `domainlm` console script (`pip install -e .` installs it) and its subcommands. Each section is the "
        "command's `--help`, generated from the code when the site is built.",
        "",
    ]
    for command, text in help_pages():
        out += [f"## `{command}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out)


def classifier_scale_block() -> str:
    """The scaling guide's table of ``benchmarks/results/classifier_scale.csv``: per training-set size and data path
    (streamed from the window caches, or in memory), data preparation, the fixed optimizer steps, prediction and
    peak RSS, with the measurement's hardware, commit and date, and the growth ratios the streamed path is held to."""
    rows, meta, dirty = result_rows(ROOT / RESULTS / "classifier_scale.csv")
    body = []
    for r in rows:
        measured = r["status"] == "measured"
        body.append(
            [
                f"{int(r['train_docs']):,}",
                r["path"].replace("_", "-"),
                num(float(r["prep_s"]), 1) if measured else "—",
                num(float(r["prep_s_per_1k_docs"]), 3) if measured else "—",
                num(float(r["step_s_median"]), 3) if measured else "—",
                num(float(r["predict_s_per_1k_docs"]), 1) if measured else "—",
                f"{float(r['peak_rss_mb']):,.0f}"
                if measured
                else f"not run: {float(r['extrapolated_peak_rss_mb']):,.0f} extrapolated",
                f"{float(r['cache_mb']):,.0f}" if measured and r["path"] == "streamed" else "—",
            ]
        )
    streamed = {int(r["train_docs"]): r for r in rows if r["path"] == "streamed" and r["status"] == "measured"}
    sizes = sorted(streamed)
    out = [
        table(
            [
                "train documents",
                "path",
                "preparation s",
                "s / 1k documents",
                "s / step",
                "prediction s / 1k documents",
                "peak RSS MB",
                "cache MB",
            ],
            body,
            ["r", "l", "r", "r", "r", "r", "r", "r"],
        ),
        "",
    ]
    if len(sizes) >= 2:
        a, b = streamed[sizes[-2]], streamed[sizes[-1]]
        out += [
            f"From {sizes[-2]:,} to {sizes[-1]:,} training documents, the streamed path's preparation time per "
            f"document grew {float(b['prep_s_per_1k_docs']) / float(a['prep_s_per_1k_docs']):.2f}× and its peak RSS "
            f"{float(b['peak_rss_mb']) / float(a['peak_rss_mb']):.2f}×.",
            "",
        ]
        import yaml

        batch = int(
            yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["classifier"]["train"]["batch_size"]
        )
        steps = math.ceil(sizes[-1] / batch)
        step_s = float(b["step_s_median"])
        out += [
            f"So a run over {sizes[-1]:,} training documents on this machine costs {float(b['prep_s']) / 60:.0f} "
            f"minutes of preparation (once, while the split and the tokenizer stay the same), then "
            f"{steps * step_s / 3600:.1f} hours per epoch that reads every document ({steps:,} steps of "
            f"`classifier.train.batch_size` {batch} at {step_s:.2f} s), or {500 * step_s / 60:.0f} minutes per epoch "
            f"with `classifier.train.max_steps_per_epoch: 500`, plus validation.",
            "",
        ]
    out.append(
        f"Measured on {md(meta['hardware'])}, commit `{meta['commit']}`{dirty}, {meta['date']} "
        "([the full file](../benchmarks.md#classifier_scale-csv))."
    )
    return "\n".join(out)


ROUND_DAYS = ROOT / RESULTS / "round_days.csv"
ROUND_DAY_NAMES = {"day1": "Day 1", "day2": "Day 2", "day3": "Day 3", "day4": "Day 4", "release": "Release day"}
START_CASES = {
    "fresh": "trained a classifier from the merged LM",
    "deployed_kept": "scored the deployed classifier first and kept it",
    "deployed_retrained": "scored the deployed classifier first and continued it",
    "deployed_widened": "widened the deployed classifier's head for new labels and continued it",
    "challenger": "trained a challenger on the new LM and scored the deployed classifier beside it",
}


def round_days_block(path: str | Path = ROUND_DAYS) -> str:
    """The table of ``benchmarks/results/round_days.csv`` (``benchmarks/round_days.py``): per day of the production
    loop (``day1``, the daily ``day2``, ``day3``, ..., ``release``), the new documents, the wall seconds, the stages
    run and how many were LM stages, the classifier's start case, its attempts, the round's decision, whether the
    merged LM changed and the peak RSS in MiB; then the hardware, commit and date of the measurement (its
    ``.meta.json`` sidecar, :func:`result_meta`), each daily round's wall time as a ratio of the release day's, and
    how each started.

    Raises:
        FileNotFoundError: ``path`` does not exist (run ``python benchmarks/round_days.py``).
        KeyError: a column is missing. StopIteration: no ``release`` row.
    """
    rows, meta, dirty = result_rows(
        path,
        "`python benchmarks/round_days.py` measures the days of the production loop (about 40 minutes on 2 idle "
        "cores) and writes it",
    )

    def lm_rebuilt(i: int, r: Mapping[str, str]) -> str:
        if int(r["merged_changed"]):
            return "yes"
        if int(r["lm_stages_run"]):
            return "built (no LM before)" if i == 0 else "no (same bytes)"
        return "no"

    def decision(r: Mapping[str, str]) -> str:
        cut = f" (cut LM release {int(float(r['lm_release']))} first)" if r.get("lm_release") else ""
        return f"{md(r['decision'])}{cut}"

    body = [
        [
            ROUND_DAY_NAMES.get(r["day"], md(r["day"]))
            + (" (`release-lm`, then a round)" if r["day"] == "release" else ""),
            f"{int(r['new_docs']):,}",
            f"{float(r['wall_s']):,.0f}",
            f"{int(r['stages_run'])} ({int(r['lm_stages_run'])})",
            code(r["start_case"]),
            r["attempts"],
            decision(r),
            lm_rebuilt(i, r),
            f"{float(r['peak_rss_mb']):,.0f}",
        ]
        for i, r in enumerate(rows)
    ]
    out = [
        table(
            [
                "Day",
                "New documents",
                "Wall s",
                "Stages run (LM stages)",
                "Start case",
                "Attempts",
                "Decision",
                "LM rebuilt (merged changed)",
                "Peak RSS MiB",
            ],
            body,
            ["l", "r", "r", "r", "l", "r", "l", "l", "r"],
        ),
        "",
        f"Measured by `benchmarks/round_days.py` on {md(meta['hardware'])}, commit `{meta['commit']}`{dirty}, "
        f"{meta['date']}.",
    ]
    release = next(r for r in rows if r["day"] == "release")
    daily = [r for r in rows if r["day"] not in ("day1", "release")]
    rel_s = float(release["wall_s"])
    names = [ROUND_DAY_NAMES.get(r["day"], md(r["day"])) for r in daily]
    walls = [float(r["wall_s"]) for r in daily]
    lm = sum(int(r["lm_stages_run"]) for r in daily)
    new_docs = ", ".join(f"{int(r['new_docs']):,}" for r in daily)
    sentence = (
        f"{' and '.join(names)} ({new_docs} new documents) took "
        f"{' and '.join(f'{w:,.0f} s' for w in walls)}, {' and '.join(f'{w / rel_s:.2f}×' for w in walls)} the "
        f"release day's {rel_s:,.0f} s, which rebuilt the LM; they ran "
        f"{' and '.join(str(int(r['stages_run'])) for r in daily)} stages, "
        f"{'none of them an LM stage' if lm == 0 else f'{lm} of them LM stages'}."
    )
    for r, name in zip(daily, names, strict=True):
        case = r["start_case"]
        sentence += f" {name} {START_CASES.get(case, 'started as ' + code(case))}"
        if r.get("train_classifier_s"):
            sentence += f" (`train_classifier` {float(r['train_classifier_s']):,.0f} s of the day)"
        if r["decision"] == "gate_failed":
            kept = float(r["test_macro_f1"])
            sentence += f"; no attempt passed the gate (the kept attempt: test macro-F1 {kept:.3f})"
        sentence += "."
        if r.get("deployed_test_macro_f1") and r.get("deployed_new_test_macro_f1"):
            sentence += (
                f" The deployed classifier scored test macro-F1 {float(r['deployed_test_macro_f1']):.3f} on the "
                f"whole test split ({int(r['test_docs']):,} documents) and "
                f"{float(r['deployed_new_test_macro_f1']):.3f} on the {int(r['new_test_docs']):,} test documents "
                "the LM release lacks (the gate reads the whole split: a day's handful of documents is noise)."
            )
    out += ["", sentence]
    return "\n".join(out)


KEPT_DAY = ROOT / RESULTS / "kept_day.csv"
KEPT_DAY_NAMES = {
    "switch": "Switch (office\\_help as a JSONL source, without the day's pages)",
    "kept": "Kept day: the pages arrive, the classifier is deployed",
    "fresh": "Fresh day (baseline): the same pages, nothing deployed",
}


def kept_day_block(path: str | Path = KEPT_DAY) -> str:
    """The table of ``benchmarks/results/kept_day.csv`` (``benchmarks/kept_day.py``): per round (``switch``,
    ``kept``, ``fresh``), the new documents, the wall seconds, the stages run and how many were LM stages, the start
    case, the attempts, the decision, ``train_classifier``'s seconds and the peak RSS in MiB; then the hardware,
    commit and date (:func:`result_meta`), and the kept day against its bar (180 s plus 60 s per retry) and against
    the fresh day.

    Raises:
        FileNotFoundError: ``path`` does not exist (run ``python benchmarks/kept_day.py``).
        KeyError: a column is missing. StopIteration: no ``kept`` or ``fresh`` row.
    """
    rows, meta, dirty = result_rows(
        path,
        "`python benchmarks/kept_day.py` times a day that keeps the deployed classifier (about 10 minutes on 2 "
        "idle cores) and writes it",
    )
    body = [
        [
            KEPT_DAY_NAMES.get(r["day"], md(r["day"])),
            f"{int(r['new_docs']):,}",
            f"{float(r['wall_s']):,.0f}",
            f"{int(r['stages_run'])} ({int(r['lm_stages_run'])})",
            code(r["start_case"]),
            r["attempts"],
            md(r["decision"]),
            f"{float(r['train_classifier_s']):,.0f}" if r.get("train_classifier_s") else "–",
            f"{float(r['peak_rss_mb']):,.0f}",
        ]
        for r in rows
    ]
    kept = next(r for r in rows if r["day"] == "kept")
    fresh = next(r for r in rows if r["day"] == "fresh")
    retries = int(kept["retries"]) if kept["start_case"] == "deployed_retrained" else 0
    allowance = 180 + 60 * retries
    wall = float(kept["wall_s"])
    sentence = (
        f"The kept day ({int(kept['new_docs']):,} new pages) took {wall:,.0f} s for the whole round "
        f"({START_CASES.get(kept['start_case'], 'started as ' + code(kept['start_case']))}; "
        f"`train_classifier` {float(kept['train_classifier_s']):,.0f} s of it), "
        f"{'within' if wall <= allowance else 'over'} its bar of {allowance} s"
        f"{f' (180 s plus 60 s for each of {retries} retries)' if retries else ''}, and "
        f"{wall / float(fresh['wall_s']):.2f}× the fresh day's {float(fresh['wall_s']):,.0f} s, which trained a "
        f"classifier from the merged LM ({int(fresh['attempts'])} attempt(s)). "
        f"LM stages run on the kept day: {int(kept['lm_stages_run'])}."
    )
    out = [
        table(
            [
                "Round",
                "New documents",
                "Wall s",
                "Stages run (LM stages)",
                "Start case",
                "Attempts",
                "Decision",
                "train\\_classifier s",
                "Peak RSS MiB",
            ],
            body,
            ["l", "r", "r", "r", "l", "r", "l", "r", "r"],
        ),
        "",
        f"Measured by `benchmarks/kept_day.py` on {md(meta['hardware'])}, commit `{meta['commit']}`{dirty}, "
        f"{meta['date']}.",
        "",
        sentence,
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- blocks


BLOCKS: dict[str, Callable[[], str]] = {
    "results": readme_results_markdown,
    "dag": dag_block,
    "configuration": configuration_markdown,
    "cli": cli_markdown,
    "classifier-scale": classifier_scale_block,
    "round-days": round_days_block,
    "kept-day": kept_day_block,
}


def fill_blocks(text: str, blocks: Mapping[str, Callable[[], str]] = BLOCKS) -> str:
    """``text`` with the body of every ``<!-- BEGIN generated: NAME -->`` … ``<!-- END generated: NAME -->``
    block replaced by ``blocks[NAME]()``. Raises ``KeyError`` for a NAME without a generator."""
    cache: dict[str, str] = {}

    def body(m: re.Match) -> str:
        name = m.group("name")
        if name not in blocks:
            raise KeyError(f"no generator for the block {name!r}; known: {sorted(blocks)}")
        if name not in cache:
            cache[name] = blocks[name]().rstrip("\n")
        return f"{m.group('begin')}{cache[name]}\n{m.group('end')}"

    return BLOCK_RE.sub(body, text)


def block_names(text: str) -> list[str]:
    """The NAMEs of the generated blocks in ``text``, in order."""
    return [m.group("name") for m in BLOCK_RE.finditer(text)]


def update_readme(path: str | Path = ROOT / "README.md") -> bool:
    """Fill ``path``'s generated blocks; returns whether the file changed."""
    p = Path(path)
    old = p.read_text(encoding="utf-8")
    new = fill_blocks(old)
    if new != old:
        p.write_text(new, encoding="utf-8")
    return new != old


def stale_blocks(path: str | Path = ROOT / "README.md") -> list[str]:
    """The NAMEs of ``path``'s generated blocks whose body differs from what the committed files give."""
    old = Path(path).read_text(encoding="utf-8")
    new_blocks = {m.group("name"): m.group("body") for m in BLOCK_RE.finditer(fill_blocks(old))}
    return [m.group("name") for m in BLOCK_RE.finditer(old) if m.group("body") != new_blocks[m.group("name")]]


PRINTERS: dict[str, Callable[[], str]] = {
    "results": results_markdown,
    "benchmarks": benchmarks_markdown,
    "configuration": configuration_markdown,
    "cli": cli_markdown,
    "dag": dag_block,
    "readme": readme_results_markdown,
}


def block_files() -> list[Path]:
    """``README.md`` and the hand-written pages under ``docs/`` that hold generated blocks."""
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md")) if block_names(p.read_text(encoding="utf-8"))]
    return [ROOT / "README.md", *pages]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--print", choices=sorted(PRINTERS), help="print one generated page's Markdown")
    g.add_argument(
        "--write-readme", action="store_true", help="fill the generated blocks of README.md and of docs/*.md pages"
    )
    g.add_argument("--check-readme", action="store_true", help="exit 1 when a generated block is out of date")
    ap.add_argument(
        "--readme", type=Path, action="append", help="only this file (repeatable; default: README.md and docs/)"
    )
    args = ap.parse_args(argv)
    if args.print:
        sys.stdout.write(PRINTERS[args.print]() + "\n")
        return 0
    status = 0
    for path in args.readme or block_files():
        if not block_names(path.read_text(encoding="utf-8")):
            print(f"{path}: no generated blocks", file=sys.stderr)
            status = 1
        elif args.write_readme:
            print(f"{path}: {'updated' if update_readme(path) else 'already up to date'}")
        elif stale := stale_blocks(path):
            print(
                f"{path}: generated blocks out of date: {', '.join(stale)} "
                "(run `python docs/scripts/tables.py --write-readme`)",
                file=sys.stderr,
            )
            status = 1
        else:
            print(f"{path}: generated blocks up to date")
    return status


if __name__ == "__main__":
    sys.exit(main())

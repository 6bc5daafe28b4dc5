"""The report's sections: each builder turns :class:`~domainlm.report.inputs.ReportInputs` into a
:class:`Section` (title, markdown, figures). ``reports/summary.ipynb`` calls one builder per cell and
shows the result with :func:`show`.

A section whose optional input is missing comes back with ``present=False``: it shows only a
"Left out" note, so the report says what it could not show instead of failing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from domainlm.report import figures, narrative, tables
from domainlm.report.inputs import CLASSIFIER_JSON, IO_SPEED_CSV, ReportInputs


@dataclass
class FigureBlock:
    """A figure and the file it becomes: ``reports/figures/<name>.png`` with ``alt`` as its alt text."""

    name: str
    alt: str
    figure: Figure


Block = str | FigureBlock


@dataclass
class Section:
    """One report section.

    Attributes:
        key: stable id (``funnel``, ``classifier``...), used in ``metrics/report.json``.
        title: the ``## `` heading.
        blocks: markdown strings and figures, in order.
        present: False when the section is left out (then ``blocks`` holds only the note).
    """

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    present: bool = True

    def markdown(self) -> str:
        """The section as markdown with figures as ``figures/<name>.png`` links (without running a notebook)."""
        parts = [f"## {self.title}"] if self.present else []
        for b in self.blocks:
            parts.append(f"![{b.alt}](figures/{b.name}.png)" if isinstance(b, FigureBlock) else b)
        return "\n\n".join(parts)


# Section keys and titles, in report order.
TITLES = {
    "headline": "Headline",
    "gate": "Quality gate and alerts",
    "changes": "What changed since the previous commit",
    "funnel": "Data funnel",
    "small_domains": "Domains too small to train on",
    "dedup": "Near-duplicate removal: the banding S-curve",
    "storage": "Parquet vs JSONL",
    "load_speed": "Load speed",
    "lora": "LoRA training",
    "task_vectors": "Task vectors",
    "perplexity": "Perplexity and retained gain",
    "continuations": "Greedy continuations",
    "refine": "Label refinement",
    "classifier": "Domain classifier",
    "limits": "Limits and what to improve",
}

FIGURE_NAMES = (
    "fig1_data_funnel",
    "fig2_dedup_s_curve",
    "fig3_parquet_vs_jsonl",
    "fig4_lora_loss",
    "fig5_task_vector_cosine",
    "fig6_perplexity",
    "fig7_refine_history",
    "fig8_classifier",
)


def _section(key: str, *blocks: Block) -> Section:
    return Section(key, TITLES[key], list(blocks))


def _left_out(key: str, reason: str) -> Section:
    return Section(key, TITLES[key], [narrative.left_out(TITLES[key], reason)], present=False)


def headline(inp: ReportInputs) -> Section:
    """The headline table (one row per first-asked number, with its source file)."""
    return _section(
        "headline",
        narrative.headline(
            inp.validate,
            inp.dedup,
            inp.split,
            inp.parquet,
            inp.base_model,
            inp.train_lora,
            inp.evaluate,
            inp.alerts,
            inp.refine,
            inp.classifier,
            inp.domains,
        ),
    )


def gate(inp: ReportInputs) -> Section:
    """The quality gate's rules, outcomes and alerts (``metrics/alerts.json``, ``metrics/evaluate.json``)."""
    return _section("gate", narrative.gate(inp.evaluate, inp.alerts, inp.domains))


def changes(metrics_diff: Mapping[str, Any] | None, diff_base: str | None) -> Section:
    """What changed since ``diff_base``; left out (with a note) when ``metrics_diff`` is None."""
    if metrics_diff is None:
        return Section("changes", TITLES["changes"], [narrative.changes(None, diff_base)], present=False)
    return _section("changes", narrative.changes(metrics_diff, diff_base))


def funnel(inp: ReportInputs) -> Section:
    """Figure 1 and the per-domain document counts, lines read to train/val/test."""
    rows = tables.funnel_rows(inp.validate, inp.dedup, inp.split, inp.domains)
    reasons = tables.removal_reasons(inp.validate, inp.dedup)
    return _section(
        "funnel",
        FigureBlock(
            FIGURE_NAMES[0],
            "Documents per domain at each step of the data pipeline (log scale), and the documents removed by reason",
            figures.data_funnel(rows, reasons),
        ),
        narrative.funnel(rows, reasons, inp.validate),
    )


def small_domains(inp: ReportInputs) -> Section:
    """Domains with fewer than :data:`tables.MIN_TRAIN_DOCS` training documents."""
    rows = tables.small_domains(inp.split, inp.train_lora, inp.evaluate, inp.domains)
    return _section("small_domains", narrative.small_domains(rows))


def dedup(inp: ReportInputs) -> Section:
    """Figure 2: the LSH banding S-curve against datasketch's default, and what the candidates became."""
    d = inp.dedup
    fig = figures.dedup_s_curve(
        d["bands"],
        d["rows"],
        d["lsh"]["threshold"],
        d["lsh"]["datasketch_default"]["bands"],
        d["lsh"]["datasketch_default"]["rows"],
        d["lsh"].get("num_perm"),
    )
    return _section(
        "dedup",
        FigureBlock(
            FIGURE_NAMES[1],
            "Probability that a pair becomes an LSH candidate against its Jaccard "
            "similarity, for this pipeline's banding and datasketch's default",
            fig,
        ),
        narrative.dedup(d),
    )


def storage(inp: ReportInputs) -> Section:
    """Figure 3: bytes per domain, JSONL vs Parquet (and load speed, when measured)."""
    rows = tables.storage_rows(inp.parquet, inp.domains)
    alt = "Bytes on disk per domain, JSONL vs Parquet" + (
        ", and documents loaded per second per loader" if inp.io_speed is not None else ""
    )
    return _section(
        "storage",
        FigureBlock(FIGURE_NAMES[2], alt, figures.storage(rows, inp.io_speed)),
        narrative.storage(rows, inp.parquet),
    )


def load_speed(inp: ReportInputs) -> Section:
    """The load-speed table of ``benchmarks/results/io_speed.csv``; left out when it is absent."""
    if inp.io_speed is None:
        return _left_out(
            "load_speed",
            f"`{IO_SPEED_CSV}` does not exist (it is written by `make bench`), so the figure above shows sizes only.",
        )
    return _section("load_speed", narrative.load_speed(inp.io_speed))


def lora(inp: ReportInputs) -> Section:
    """Figure 4: LoRA training and validation loss per domain, and the per-domain run table."""
    rows = tables.lora_rows(inp.train_lora, inp.domains)
    return _section(
        "lora",
        FigureBlock(
            FIGURE_NAMES[3],
            "LoRA training and validation loss per domain against the optimizer step",
            figures.lora_loss(inp.train_loss, rows),
        ),
        narrative.lora(rows),
    )


def task_vectors(inp: ReportInputs) -> Section:
    """Figure 5: the task-vector cosine heatmap, norms and the merge's settings."""
    matrix = tables.cosine_matrix(inp.cosine, inp.domains)
    return _section(
        "task_vectors",
        FigureBlock(
            FIGURE_NAMES[4], "Cosine similarity between the domains' task vectors", figures.cosine_heatmap(matrix)
        ),
        narrative.task_vectors(matrix, inp.task_vectors, inp.merge, inp.domains),
    )


def perplexity(inp: ReportInputs) -> Section:
    """Figure 6: perplexity as model × domain and the retained gain per domain."""
    matrix = tables.perplexity_matrix(inp.perplexity, inp.domains)
    gains = tables.gain_rows(inp.evaluate, inp.domains)
    gate_min = (inp.alerts.get("thresholds") or {}).get("min_mean_retained_gain")
    return _section(
        "perplexity",
        FigureBlock(
            FIGURE_NAMES[5],
            "Test perplexity of every model on every domain, and the merged model's retained gain per domain",
            figures.perplexity(matrix, gains, gate_min),
        ),
        narrative.perplexity(gains, inp.evaluate),
    )


def continuations(inp: ReportInputs) -> Section:
    """Greedy continuations: repetition, BLEU/chrF and one example per domain."""
    comparison = tables.parse_comparison(inp.comparison_md)
    rows = tables.continuation_rows(comparison)
    return _section("continuations", narrative.continuations(rows, comparison, inp.evaluate))


def refine(inp: ReportInputs) -> Section:
    """Figure 7: label-refinement history (change rate, τ, accuracy per iteration)."""
    return _section(
        "refine",
        FigureBlock(
            FIGURE_NAMES[6],
            "Label change rate, confidence threshold and validation accuracy per refinement iteration",
            figures.refine_history(inp.refine_history),
        ),
        narrative.refine(inp.refine, inp.refine_history),
    )


def classifier(inp: ReportInputs) -> Section:
    """Figure 8: the classifier's confusion matrix and macro-F1 vs baseline; left out when absent."""
    if inp.classifier is None:
        return _left_out(
            "classifier",
            f"`{CLASSIFIER_JSON}` does not exist yet (`train_classifier` has not "
            "run); its confusion matrix and macro-F1 against the baseline will appear here once it does.",
        )
    return _section(
        "classifier",
        FigureBlock(
            FIGURE_NAMES[7],
            "Confusion matrix of the domain classifier, and its macro-F1 against the baseline",
            figures.classifier(inp.classifier),
        ),
        narrative.classifier(inp.classifier),
    )


def limits(inp: ReportInputs) -> Section:
    """Limits and suggestions, each triggered by a number shown above."""
    return _section(
        "limits",
        narrative.limits(
            small=tables.small_domains(inp.split, inp.train_lora, inp.evaluate, inp.domains),
            gains=tables.gain_rows(inp.evaluate, inp.domains),
            lora_rows=tables.lora_rows(inp.train_lora, inp.domains),
            cosine_pairs=tables.off_diagonal(tables.cosine_matrix(inp.cosine, inp.domains)),
            continuation_rows=tables.continuation_rows(tables.parse_comparison(inp.comparison_md)),
            base_model=inp.base_model,
            merge=inp.merge,
            dedup_metrics=inp.dedup,
            refine_metrics=inp.refine,
            io_speed=inp.io_speed,
            classifier_metrics=inp.classifier,
        ),
    )


def build_all(
    inp: ReportInputs, metrics_diff: Mapping[str, Any] | None = None, diff_base: str | None = None
) -> list[Section]:
    """Every section in report order (what the notebook shows, for use without a kernel)."""
    return [
        headline(inp),
        gate(inp),
        changes(metrics_diff, diff_base),
        funnel(inp),
        small_domains(inp),
        dedup(inp),
        storage(inp),
        load_speed(inp),
        lora(inp),
        task_vectors(inp),
        perplexity(inp),
        continuations(inp),
        refine(inp),
        classifier(inp),
        limits(inp),
    ]


def show(section: Section) -> None:
    """Display a section in a notebook: its heading and text as markdown, each figure as a PNG output.

    A figure's output metadata carries ``filename`` (``<name>.png``, which nbconvert's
    ``ExtractOutputPreprocessor`` uses as the file name) and ``alt`` (the alt text in ``report.md``).
    The figure is closed after rendering.
    """
    from IPython.display import Markdown, display, publish_display_data

    if section.present:
        display(Markdown(f"## {section.title}"))
    for block in section.blocks:
        if isinstance(block, FigureBlock):
            png = figures.png_bytes(block.figure)
            publish_display_data(
                {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": block.alt},
                metadata={"filename": f"{block.name}.png", "alt": block.alt},
            )
        else:
            display(Markdown(block))

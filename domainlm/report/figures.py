"""The report's figures: one function per figure, plain data in, a matplotlib ``Figure`` out.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, no pyplot state), so
they need no display and no GUI backend; :func:`png_bytes` renders one to PNG. Every axis is
labelled with its unit. Colours: one per domain, the same in every figure (:func:`domain_colors`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from domainlm.report import tables

DPI = 100  # PNG resolution: with a 256-colour palette, 10-40 KB per figure


def domain_colors(domains: Sequence[str]) -> dict[str, Any]:
    """One colour per domain (matplotlib's ``tab10``), fixed by the domain's position."""
    cmap = colormaps["tab10"]
    return {d: cmap(i % 10) for i, d in enumerate(domains)}


def png_bytes(fig: Figure, dpi: int = DPI, colors: int = 256) -> bytes:
    """Render ``fig`` to PNG bytes at ``dpi``, as a ``colors``-colour palette image.

    A palette (median-cut quantisation, Pillow) makes these flat-colour charts about 3× smaller than
    24-bit PNG with no visible change, which keeps the committed report small. No software version
    goes into the metadata, so equal figures give equal bytes.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    buf.seek(0)
    with Image.open(buf) as im:
        palette = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _annotate_heatmap(ax, values: np.ndarray, fmt: str, *, threshold: float | None = None, norm=None) -> None:
    """Write each cell's value on a heatmap, white on dark cells."""
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        dark = norm is not None and threshold is not None and abs(norm(v) - 0.5) > threshold
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")


# ------------------------------------------------------------------------------------------ 1
def data_funnel(funnel: list[dict[str, Any]], reasons: Mapping[str, int]) -> Figure:
    """Figure 1: documents per domain at each step (log scale) and the documents removed, by reason.

    Args:
        funnel: :func:`tables.funnel_rows`.
        reasons: :func:`tables.removal_reasons`.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, ax_r = fig.subplots(1, 2, width_ratios=[2.6, 1])
    steps = [
        ("lines_read", "lines read"),
        ("validated", "kept by validation"),
        ("deduplicated", "after dedup"),
        ("train", "train"),
        ("val", "val"),
        ("test", "test"),
    ]
    x = np.arange(len(funnel))
    width = 0.8 / len(steps)
    cmap = colormaps["viridis"]
    for k, (key, label) in enumerate(steps):
        values = [r[key] if r[key] is not None else np.nan for r in funnel]
        bars = ax.bar(
            x + (k - (len(steps) - 1) / 2) * width, values, width, label=label, color=cmap(k / (len(steps) - 1))
        )
        ax.bar_label(
            bars, labels=["" if np.isnan(v) else f"{int(v)}" for v in values], fontsize=6, rotation=90, padding=2
        )
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(r["lines_read"] or r["validated"] for r in funnel) * 6)
    ax.set_xticks(x, [r["domain"] for r in funnel])
    ax.set_xlabel("domain")
    ax.set_ylabel("documents (log scale)")
    ax.set_title("Data funnel per domain")
    ax.legend(fontsize=7, ncols=3, loc="upper left")

    names = list(reasons)[::-1]
    bars = ax_r.barh(names, [reasons[n] for n in names], color="tab:red")
    ax_r.bar_label(bars, fontsize=8, padding=2)
    ax_r.set_xlabel("documents (all domains)")
    ax_r.set_title("Removed, by reason")
    ax_r.set_xlim(0, max(reasons.values(), default=1) * 1.25)
    ax_r.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax_r.tick_params(axis="y", labelsize=8)
    return fig


# ------------------------------------------------------------------------------------------ 2
def dedup_s_curve(
    bands: int, rows: int, threshold: float, default_bands: int, default_rows: int, num_perm: int | None = None
) -> Figure:
    """Figure 2: P(candidate | J) = 1 − (1 − J^r)^b for the pipeline's banding and datasketch's default.

    Args:
        bands, rows: the pipeline's LSH banding (``metrics/dedup.json`` bands, rows).
        threshold: the Jaccard threshold (``lsh.threshold``), drawn as a vertical line.
        default_bands, default_rows: datasketch's ``MinHashLSH`` choice for the same threshold and
            ``num_perm`` (``lsh.datasketch_default``).
        num_perm: MinHash permutations, for the legend.
    """
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    j = np.linspace(0, 1, 401)
    perms = f" ({bands * rows} of {num_perm} permutations)" if num_perm else ""
    curves = [
        (bands, rows, f"this pipeline: b={bands} bands × r={rows} rows{perms}", "tab:blue", "-"),
        (default_bands, default_rows, f"datasketch default: b={default_bands} × r={default_rows}", "tab:orange", "--"),
    ]
    for b, r, label, color, ls in curves:
        ax.plot(j, tables.p_candidate(j, b, r), color=color, ls=ls, lw=2, label=label)
        p = float(tables.p_candidate(threshold, b, r))
        ax.plot([threshold], [p], "o", color=color)
        ax.annotate(
            f"{p:.3f}",
            (threshold, p),
            textcoords="offset points",
            xytext=(-34, 4 if p > 0.5 else -12),
            color=color,
            fontsize=9,
        )
    ax.axvline(threshold, color="grey", ls=":", lw=1.5, label=f"threshold J = {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Jaccard similarity J of a document pair (shingle sets, 0–1)")
    ax.set_ylabel("P(pair becomes an LSH candidate)")
    ax.set_title("MinHash-LSH banding S-curve")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------ 3
def storage(storage_rows: list[dict[str, Any]], io_speed: pd.DataFrame | None) -> Figure:
    """Figure 3: bytes on disk per domain (JSONL vs Parquet) and, when measured, load speed per loader.

    Args:
        storage_rows: :func:`tables.storage_rows`.
        io_speed: ``benchmarks/results/io_speed.csv`` (loader, docs_per_s, speedup_vs_jsonl, ...) or
            None, which leaves the load-speed panel out.
    """
    fig = Figure(figsize=(10 if io_speed is not None else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if io_speed is not None else 1, squeeze=False)[0]
    ax = axes[0]
    x = np.arange(len(storage_rows))
    for k, (key, label, color) in enumerate(
        [("jsonl_bytes", "JSONL", "tab:gray"), ("parquet_bytes", "Parquet", "tab:green")]
    ):
        ax.bar(x + (k - 0.5) * 0.38, [r[key] for r in storage_rows], 0.38, label=label, color=color)
    for i, r in enumerate(storage_rows):
        ax.annotate(
            f"{r['compression_ratio']:.1f}× smaller",
            (i, r["jsonl_bytes"]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["jsonl_bytes"] for r in storage_rows) * 4)
    ax.set_xticks(x, [r["domain"] for r in storage_rows])
    ax.set_xlabel("domain")
    ax.set_ylabel("bytes on disk (log scale)")
    ax.set_title("Size: JSONL vs Parquet")
    ax.legend(fontsize=8, loc="upper left")
    if io_speed is not None:
        ax = axes[1]
        bars = ax.bar(io_speed["loader"], io_speed["docs_per_s"], color=colormaps["tab10"](np.arange(len(io_speed))))
        ax.bar_label(bars, labels=[f"{s:.2f}×" for s in io_speed["speedup_vs_jsonl"]], fontsize=8, padding=2)
        ax.set_ylim(0, float(io_speed["docs_per_s"].max()) * 1.18)
        ax.set_xlabel("loader (benchmarks/io_speed.py)")
        ax.set_ylabel("documents loaded per second (docs/s)")
        ax.set_title("Load speed (label: speed-up vs JSONL)")
        ax.tick_params(axis="x", labelsize=8)
    return fig


# ------------------------------------------------------------------------------------------ 4
def lora_loss(train_loss: pd.DataFrame, lora_rows: list[dict[str, Any]]) -> Figure:
    """Figure 4: LoRA training loss (solid) and validation loss (dashed, step 0 = the base) per domain.

    Args:
        train_loss: ``plots/train_loss.csv`` (domain, step, loss, eval_loss; nats/token).
        lora_rows: :func:`tables.lora_rows` (for the best step, marked by a dotted line).
    """
    domains = [r["domain"] for r in lora_rows]
    colors = domain_colors(domains)
    ncols = min(len(domains), 2)
    nrows = math.ceil(len(domains) / ncols)
    fig = Figure(figsize=(9, 2.6 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, row in zip(axes, lora_rows):
        d = row["domain"]
        part = train_loss[train_loss["domain"] == d]
        tr = part.dropna(subset=["loss"])
        ev = part.dropna(subset=["eval_loss"])
        ax.plot(tr["step"], tr["loss"], color=colors[d], lw=1.5, label="training loss")
        ax.plot(ev["step"], ev["eval_loss"], color=colors[d], ls="--", marker="o", ms=4, label="validation loss")
        ax.axvline(row["best_step"], color="grey", ls=":", lw=1, label="best step (kept)")
        ax.set_title(f"{d}: {row['steps']} steps, {row['tokens_seen']} tokens", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    for ax in axes[len(lora_rows) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle("LoRA fine-tuning per domain")
    return fig


# ------------------------------------------------------------------------------------------ 5
def cosine_heatmap(matrix: pd.DataFrame) -> Figure:
    """Figure 5: cosine similarity of the domains' task vectors Δ = θ_expert − θ_base (Ilharco et al. 2023).

    Args:
        matrix: :func:`tables.cosine_matrix` (square, domains × domains).
    """
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.subplots()
    values = matrix.to_numpy(dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    vmax = max(0.1, float(np.abs(off).max()) * 1.25) if off.size else 1.0
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
    im = ax.imshow(values, cmap="RdBu_r", norm=norm)
    _annotate_heatmap(ax, values, ".2f", threshold=0.35, norm=norm)
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    ax.set_xlabel("domain (task vector)")
    ax.set_ylabel("domain (task vector)")
    ax.set_title("Task-vector cosine similarity")
    fig.colorbar(im, ax=ax, label=f"cosine similarity (−1…1; colour scale ±{vmax:.2f})", extend="both")
    return fig


# ------------------------------------------------------------------------------------------ 6
def perplexity(matrix: pd.DataFrame, gains: list[dict[str, Any]], gate_min_mean: float | None) -> Figure:
    """Figure 6: test perplexity as model × domain, coloured by change against the base; retained gain per domain.

    Args:
        matrix: :func:`tables.perplexity_matrix` (models × domains).
        gains: :func:`tables.gain_rows`.
        gate_min_mean: the quality gate's ``min_mean_retained_gain`` (dashed line), or None.
    """
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax, ax_g = fig.subplots(1, 2, width_ratios=[1.5, 1])
    values = matrix.to_numpy(dtype=float)
    change = (values / values[list(matrix.index).index("base")] - 1.0) * 100.0
    lim = max(1.0, float(np.nanmax(np.abs(change))))
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    im = ax.imshow(change, cmap="coolwarm", norm=norm, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{v:.0f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if abs(change[i, j]) > 0.6 * lim else "black",
        )
    ax.set_xticks(range(len(matrix.columns)), matrix.columns)
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    ax.set_xlabel("test split of domain")
    ax.set_ylabel("model")
    ax.set_title("Test perplexity (numbers) and change vs base (colour)")
    fig.colorbar(im, ax=ax, label="perplexity change vs base (%)")

    colors = domain_colors([g["domain"] for g in gains])
    names = [g["domain"] for g in gains]
    bars = ax_g.bar(names, [g["retained_gain"] for g in gains], color=[colors[n] for n in names])
    ax_g.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    mean = float(np.mean([g["retained_gain"] for g in gains]))
    ax_g.axhline(mean, color="black", lw=1.2, label=f"mean {mean:.3f}")
    if gate_min_mean is not None:
        ax_g.axhline(gate_min_mean, color="tab:red", ls="--", lw=1.2, label=f"gate: mean ≥ {gate_min_mean:g}")
    ax_g.axhline(1.0, color="grey", ls=":", lw=1, label="1 = as good as the expert")
    ax_g.set_ylim(
        min(0.0, min(g["retained_gain"] for g in gains) * 1.2), max(1.1, max(g["retained_gain"] for g in gains)) * 1.4
    )
    ax_g.set_xlabel("domain")
    ax_g.set_ylabel("retained gain (share of the expert's drop)")
    ax_g.set_title("Merged model: retained gain")
    ax_g.legend(fontsize=7, loc="upper left", ncols=2)
    ax_g.tick_params(axis="x", labelsize=8)
    return fig


# ------------------------------------------------------------------------------------------ 7
def refine_history(history: pd.DataFrame) -> Figure:
    """Figure 7: label refinement per iteration: label change rate and τ; validation accuracy per member.

    Args:
        history: ``plots/refine_history.csv`` (iteration, tau, label_change_rate, val_accuracy_<member>...).
    """
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, ax_acc = fig.subplots(1, 2)
    it = history["iteration"].to_numpy()
    rates = [("label_change_rate", "labels changed", "tab:purple")]
    if "lexical_feature_change_rate" in history.columns:
        rates.append(("lexical_feature_change_rate", "top lexical features changed", "tab:olive"))
    width = 0.7 / len(rates)
    for k, (col, label, color) in enumerate(rates):
        bars = ax.bar(it + (k - (len(rates) - 1) / 2) * width, history[col] * 100.0, width, color=color, label=label)
        ax.bar_label(bars, fmt="%.2f%%", fontsize=8, padding=2)
    ax.set_xticks(it)
    ax.set_ylim(0, max(float((history[[c for c, _, _ in rates]] * 100.0).to_numpy().max()) * 1.3, 0.1))
    ax.set_xlabel("iteration")
    ax.set_ylabel("change rate (% of documents / features)")
    ax.set_title("Change per iteration, and threshold τ")
    ax_tau = ax.twinx()
    ax_tau.plot(it, history["tau"], "o-", color="tab:orange", label="confidence threshold τ")
    ax_tau.set_ylim(0, 1)
    ax_tau.set_ylabel("confidence threshold τ (probability, 0–1)")
    handles = ax.get_legend_handles_labels()
    tau_handles = ax_tau.get_legend_handles_labels()
    ax.legend(handles[0] + tau_handles[0], handles[1] + tau_handles[1], fontsize=7, loc="upper right")
    members = [c for c in history.columns if c.startswith("val_accuracy_")]
    for c in members:
        name = c.removeprefix("val_accuracy_")
        ensemble = name == "ensemble"
        ax_acc.plot(it, history[c], "o-", lw=2.5 if ensemble else 1.2, color="black" if ensemble else None, label=name)
    ax_acc.set_xticks(it)
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("validation accuracy (fraction)")
    ax_acc.set_title("Validation accuracy per member")
    ax_acc.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax_acc.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------------ 8
def classifier(classifier_metrics: Mapping[str, Any]) -> Figure:
    """Figure 8: the domain classifier's confusion matrix (row-normalised colour, counts written) and its
    macro-F1 against the baseline.

    Args:
        classifier_metrics: ``metrics/classifier.json``; shape in :mod:`domainlm.report.inputs`.
    """
    cm = classifier_metrics["lora"]["confusion_matrix"]
    labels = list(cm["labels"])
    counts = np.asarray(cm["matrix"], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig = Figure(figsize=(10, max(4.4, 0.32 * len(labels) + 1.8)), layout="constrained")
    ax, ax_f1 = fig.subplots(1, 2, width_ratios=[1.5, 1])
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(counts):
        ax.text(
            j, i, f"{int(v)}", ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.6 else "black"
        )
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("Classifier confusion matrix (counts)")
    fig.colorbar(im, ax=ax, label="share of the true label's documents (0–1)")
    names = ["baseline", "LoRA classifier"]
    f1 = [classifier_metrics["baseline"]["macro_f1"], classifier_metrics["lora"]["macro_f1"]]
    bars = ax_f1.bar(names, f1, color=["tab:gray", "tab:blue"])
    ax_f1.bar_label(bars, fmt="%.3f", fontsize=9, padding=2)
    ax_f1.set_ylim(0, 1.05)
    ax_f1.set_ylabel("macro-F1 (0–1)")
    ax_f1.set_xlabel("model")
    ax_f1.set_title("Macro-F1 vs baseline")
    return fig

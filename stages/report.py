"""report: execute ``reports/summary.ipynb`` headless (nbclient) and export ``reports/report.md`` with PNG
figures (nbconvert's MarkdownExporter); the notebook reads only ``metrics/``, ``plots/`` and ``eval/``."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from domainlm.common import paths
from domainlm.common.atomic import atomic_path, write_text
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.report import (
    EXECUTED_NOTEBOOK,
    FIGURES_DIR,
    METRICS_NAME,
    REPORT_MD,
    SOURCE_NOTEBOOK,
    notebook,
    sections,
    tables,
)
from domainlm.report.metrics_diff import dvc_metrics_diff, head_commit

_LEFT_OUT = re.compile(r"^> \*\*Left out: (.+?)\.\*\*", re.M)
_HEADING = re.compile(r"^## (.+?)\s*$", re.M)


def run(
    notebook_path: str | os.PathLike,
    root: str | os.PathLike,
    report_md: str | os.PathLike,
    figures_dir: str | os.PathLike,
    executed_notebook: str | os.PathLike,
    *,
    metrics_diff: Mapping[str, Any] | None = None,
    diff_base: str | None = None,
    timeout_s: int = 300,
) -> dict[str, Any]:
    """Execute the report notebook and write the markdown report, its figures and the executed notebook.

    Args:
        notebook_path: the source notebook (``reports/summary.ipynb``).
        root: the folder holding ``metrics/``, ``plots/``, ``eval/`` (the kernel's working folder).
        report_md: where the markdown goes; figures are linked relative to its folder.
        figures_dir: the folder for the PNG figures (replaced whole, so no stale figure survives).
        executed_notebook: where the executed notebook, outputs included, goes.
        metrics_diff: ``dvc metrics diff HEAD --json`` output, passed to the notebook as a parameter;
            None leaves the "what changed" section out with a note.
        diff_base: the commit ``metrics_diff`` compares against (short hash), for the text.
        timeout_s: limit per notebook cell, seconds.

    Returns:
        Metrics: figures (count), figure_bytes, markdown_bytes, sections {present, left_out} (counts),
        present {section key: 1 | 0}, metrics_diff {available, result_changes, run_cost_changes},
        code_cells, execute_s (seconds).

    Raises:
        FileNotFoundError: a required input under ``root`` is missing (raised inside the notebook).
        nbclient.exceptions.CellExecutionError: a notebook cell failed; the message has its traceback.
        ValueError: ``report_md`` links a figure that was not produced.
    """
    report_md, figures_dir = Path(report_md), Path(figures_dir)
    nb = notebook.inject_parameters(
        notebook.read(notebook_path), {"metrics_diff": metrics_diff, "diff_base": diff_base}
    )
    started = time.perf_counter()
    executed = notebook.execute(nb, cwd=root, timeout_s=timeout_s)
    execute_s = time.perf_counter() - started
    rel = Path(os.path.relpath(figures_dir, report_md.parent)).as_posix()
    markdown, figure_files = notebook.export_markdown(executed, rel)

    linked = set(re.findall(rf"\]\({re.escape(rel)}/([^)]+\.png)\)", markdown))
    if linked - set(figure_files):
        raise ValueError(f"{report_md} links figures that were not produced: {sorted(linked - set(figure_files))}")
    with atomic_path(figures_dir, is_dir=True) as tmp:
        for name, data in sorted(figure_files.items()):
            (tmp / name).write_bytes(data)
    write_text(report_md, markdown)
    with atomic_path(executed_notebook) as tmp:
        notebook.write(executed, tmp)

    by_title = {title: key for key, title in sections.TITLES.items()}
    present = {by_title[t] for t in _HEADING.findall(markdown) if t in by_title}
    left_out = {by_title[t] for t in _LEFT_OUT.findall(markdown) if t in by_title}
    changes, n_cost = tables.change_rows(metrics_diff) if metrics_diff is not None else ([], 0)
    return {
        "figures": len(figure_files),
        "figure_bytes": sum(len(d) for d in figure_files.values()),
        "markdown_bytes": len(markdown.encode("utf-8")),
        "sections": {"present": len(present), "left_out": len(left_out)},
        "present": {key: int(key in present) for key in sections.TITLES},
        "metrics_diff": {
            "available": int(metrics_diff is not None),
            "result_changes": len(changes),
            "run_cost_changes": n_cost,
        },
        "code_cells": sum(c.cell_type == "code" for c in executed.cells),
        "execute_s": round(execute_s, 3),
    }


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("report", __doc__, argv)
    with stage_run("report") as st:
        # Checked: `dvc metrics diff` runs fine inside `dvc repro` (DVC unlocks the repo while a stage's
        # command runs); see domainlm/report/metrics_diff.py.
        diff_base = head_commit()
        metrics_diff = (
            dvc_metrics_diff("HEAD", exclude=(str(paths.METRICS_DIR / f"{METRICS_NAME}.json"),)) if diff_base else None
        )
        if metrics_diff is None:
            st.log.warning("no dvc metrics diff against HEAD: the report leaves 'what changed' out")
        metrics = run(
            SOURCE_NOTEBOOK,
            Path("."),
            REPORT_MD,
            FIGURES_DIR,
            EXECUTED_NOTEBOOK,
            metrics_diff=metrics_diff,
            diff_base=diff_base,
        )
        st.write_metrics(METRICS_NAME, metrics)
        left = [k for k, v in metrics["present"].items() if not v]
        st.log.info(
            "%s: %d sections, %d figures (%.0f KB), left out: %s; notebook ran in %.1f s",
            REPORT_MD,
            metrics["sections"]["present"],
            metrics["figures"],
            metrics["figure_bytes"] / 1024,
            ", ".join(left) or "nothing",
            metrics["execute_s"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])

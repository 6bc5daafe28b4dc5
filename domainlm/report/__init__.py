"""The run's report: a notebook computed from ``metrics/``, ``plots/`` and ``eval/``, exported to markdown.

- :mod:`domainlm.report.inputs`: the files it reads (two of them optional) and their expected shapes.
- :mod:`domainlm.report.tables`: the numbers, as rows, shared by figures and text.
- :mod:`domainlm.report.figures`: one matplotlib figure per function.
- :mod:`domainlm.report.narrative`: markdown tables and text, computed from the numbers.
- :mod:`domainlm.report.sections`: what ``reports/summary.ipynb`` shows, one section per cell.
- :mod:`domainlm.report.metrics_diff`: ``dvc metrics diff HEAD --json`` for "what changed".
- :mod:`domainlm.report.notebook`: headless execution (nbclient) and markdown export (nbconvert).

The report's own paths (relative to the repository root; ``dvc.yaml`` names them as the ``report``
stage's deps and outs):
"""

from __future__ import annotations

from pathlib import Path

REPORTS_DIR = Path("reports")
SOURCE_NOTEBOOK = REPORTS_DIR / "summary.ipynb"  # the source, without outputs
EXECUTED_NOTEBOOK = REPORTS_DIR / "summary.executed.ipynb"  # the same, executed, outputs included
REPORT_MD = REPORTS_DIR / "report.md"
FIGURES_DIR = REPORTS_DIR / "figures"  # <name>.png, linked from report.md
METRICS_NAME = "report"  # metrics/report.json

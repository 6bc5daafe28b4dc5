"""Execute the report notebook headless and export it to markdown with PNG figures.

- Parameters go in as a cell tagged ``injected-parameters`` right after the cell tagged
  ``parameters`` (papermill's convention, without papermill).
- :func:`execute` runs every cell with nbclient in a fresh IPython kernel that is this interpreter
  (``sys.executable``, the venv's python), whatever kernelspecs are installed elsewhere; the kernel
  starts in the folder that holds ``metrics/``, ``plots/`` and ``eval/``, talks to nbclient over
  Unix sockets (no network), and uses matplotlib's Agg backend (no display).
- :func:`export_markdown` runs nbconvert's ``MarkdownExporter`` without code cells; its
  ``ExtractOutputPreprocessor`` turns each PNG output into a file named by the output's
  ``filename`` metadata, and the template writes the output's ``alt`` metadata as alt text.
"""

from __future__ import annotations

import copy
import json
import os
import pprint
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
from jinja2 import DictLoader
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbconvert.exporters import MarkdownExporter
from nbformat import NotebookNode
from traitlets.config import Config

import domainlm

PACKAGE_ROOT = Path(domainlm.__file__).resolve().parents[1]  # the folder holding domainlm/, for the kernel's path
KERNEL_NAME = "python3"

# nbconvert's markdown template, with the figure's alt text instead of "png".
_TEMPLATE = """{%- extends 'markdown/index.md.j2' -%}
{% block data_png %}
![{{ output.metadata.get('alt', 'figure') }}]({{ output.metadata.filenames['image/png'] | path2url }})
{% endblock data_png %}
"""


class ThisInterpreterKernelSpecs(KernelSpecManager):
    """Kernelspecs where ``python3`` is always ipykernel on ``sys.executable`` (the venv's python).

    An installed ``python3`` kernelspec (user-wide, or another environment's) could point at an
    interpreter without this project's packages; the report must run on the pipeline's own.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == KERNEL_NAME:
            from ipykernel.kernelspec import RESOURCES, get_kernel_dict

            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
        return super().get_kernel_spec(kernel_name)


def read(path: str | os.PathLike) -> NotebookNode:
    """Read a notebook (nbformat 4)."""
    return nbformat.read(str(path), as_version=4)


def inject_parameters(nb: NotebookNode, parameters: Mapping[str, Any]) -> NotebookNode:
    """A copy of ``nb`` with a cell assigning ``parameters`` after the cell tagged ``parameters``.

    Values must be JSON data (dicts, lists, strings, numbers, booleans, None); they are written as
    Python literals, which round-trip exactly. Without a cell tagged ``parameters`` the new cell goes first.

    Raises:
        TypeError: a value is not JSON data.
    """
    nb = copy.deepcopy(nb)
    lines = ["# Injected by the report stage (domainlm.report.notebook.inject_parameters)"]
    lines += [
        f"{name} = {pprint.pformat(_plain(value), width=110, sort_dicts=True)}" for name, value in parameters.items()
    ]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(at, cell)
    return nb


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (raises TypeError for anything else, e.g. a numpy number or a path)."""
    return json.loads(json.dumps(value))


def execute(
    nb: NotebookNode, cwd: str | os.PathLike, *, timeout_s: int = 300, startup_timeout_s: int = 120
) -> NotebookNode:
    """Run every cell of ``nb`` in a fresh kernel started in ``cwd``; return the notebook with outputs.

    Args:
        nb: the notebook (left unchanged; a copy is executed).
        cwd: the kernel's working folder (where ``metrics/``, ``plots/``, ``eval/`` are).
        timeout_s: limit per cell, seconds.
        startup_timeout_s: limit for the kernel to start, seconds.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; the message holds its traceback.
        TimeoutError / RuntimeError: the kernel did not start or a cell ran past ``timeout_s``.
    """
    nb = copy.deepcopy(nb)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MPLBACKEND"] = "Agg"
    env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    # IPC transport: kernel and client talk over Unix sockets (no TCP port at all). The socket path
    # prefix must be absolute, since the kernel starts in ``cwd`` and the client does not.
    with tempfile.TemporaryDirectory(prefix="report-kernel-") as sockets:
        km = AsyncKernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=ThisInterpreterKernelSpecs(),
            transport="ipc",
            ip=str(Path(sockets) / "kernel"),
        )
        client = NotebookClient(
            nb,
            km=km,
            timeout=timeout_s,
            startup_timeout=startup_timeout_s,
            kernel_name=KERNEL_NAME,
            record_timing=False,
            allow_errors=False,
            resources={"metadata": {"path": str(cwd)}},
        )
        client.owns_km = True  # nbclient shuts down only kernels it owns: make it shut this one down too
        client.execute(env=env)
    return nb


def export_markdown(nb: NotebookNode, figures_dirname: str) -> tuple[str, dict[str, bytes]]:
    """Markdown of the executed ``nb`` (outputs only, no code) and its PNG figures.

    Args:
        nb: an executed notebook.
        figures_dirname: the figures folder relative to the markdown file (``figures``); image
            links are ``<figures_dirname>/<name>.png``.

    Returns:
        (markdown, {file name: PNG bytes}); file names have no folder part.

    Raises:
        ValueError: when two figures have the same file name.
    """
    config = Config({"ExtractOutputPreprocessor": {"enabled": True, "extract_output_types": {"image/png"}}})
    exporter = MarkdownExporter(
        config=config,
        extra_loaders=[DictLoader({"report.md.j2": _TEMPLATE})],
        template_file="report.md.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, resources = exporter.from_notebook_node(
        nb, resources={"output_files_dir": figures_dirname, "unique_key": "figure"}
    )
    files: dict[str, bytes] = {}
    for name, data in (resources.get("outputs") or {}).items():
        base = Path(name).name
        if base in files:
            raise ValueError(f"two figures are named {base}")
        files[base] = data
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n", files


def write(nb: NotebookNode, path: str | os.PathLike) -> None:
    """Write ``nb`` to ``path`` (nbformat 4, UTF-8); callers make it atomic."""
    Path(path).write_text(nbformat.writes(nb) + "\n", encoding="utf-8")

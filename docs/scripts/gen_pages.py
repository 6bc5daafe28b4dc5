"""The site's generated pages (mkdocs-gen-files runs this at every ``mkdocs build``/``serve``; ``mkdocs.yml`` names it).

Writes, from the committed files, through ``docs/scripts/tables.py``:

- ``results.md``: the headline results from ``metrics/*.json``;
- ``benchmarks.md``: a section per file under ``benchmarks/results/``, and the raw files under
  ``benchmark-results/`` (the sections link them);
- ``reference/configuration.md``: every key of ``params.yaml`` with the stages that read it;
- ``reference/cli.md``: the ``--help`` of every ``domainlm`` command;
- ``changelog.md``: ``CHANGELOG.md`` of the repository root;
- the generated blocks (``<!-- BEGIN generated: NAME -->``) of the hand-written pages, e.g. the DAG in
  ``pipeline.md``.

None of these files exists under ``docs/``; they live only in the build. A missing input (``CHANGELOG.md``) is
logged as a warning, which ``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import mkdocs_gen_files

HERE = Path(__file__).resolve().parent
log = logging.getLogger(f"mkdocs.plugins.{__name__}")


def _load_tables():
    """``docs/scripts/tables.py`` as a module (by path: the name ``tables`` may be taken by an installed package)."""
    spec = importlib.util.spec_from_file_location("domainlm_docs_tables", HERE / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tables = _load_tables()
ROOT = tables.ROOT
DOCS = ROOT / "docs"


def write(page: str, text: str, edit: str | None) -> None:
    """Write the generated ``page`` (a path under docs/); its "edit" link points at ``edit`` (a repository path)."""
    with mkdocs_gen_files.open(page, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    mkdocs_gen_files.set_edit_path(page, edit)


write("results.md", tables.results_markdown(), "../docs/scripts/tables.py")
write("benchmarks.md", tables.benchmarks_markdown(), "../docs/scripts/tables.py")
for path in tables.result_files():
    with mkdocs_gen_files.open(f"benchmark-results/{path.name}", "wb") as fh:
        fh.write(path.read_bytes())
write("reference/configuration.md", tables.configuration_markdown(), "../params.yaml")
write("reference/cli.md", tables.cli_markdown(), "../domainlm/cli.py")

changelog = ROOT / "CHANGELOG.md"
if changelog.is_file():
    write("changelog.md", changelog.read_text(encoding="utf-8"), "../CHANGELOG.md")
else:
    log.warning("CHANGELOG.md is missing at the repository root: the changelog page says so")
    write("changelog.md", "# Changelog\n\n`CHANGELOG.md` is missing from the repository root.\n", None)

# Hand-written pages with generated blocks: fill the blocks in the built copy (docs/ itself is not changed).
for page in sorted(DOCS.rglob("*.md")):
    text = page.read_text(encoding="utf-8")
    if tables.block_names(text):
        rel = page.relative_to(DOCS).as_posix()
        write(rel, tables.fill_blocks(text), rel)

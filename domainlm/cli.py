"""``domainlm``: one console script for the pipeline's entry points (typer; ``[project.scripts]`` in pyproject.toml).

Command tree::

    domainlm [--repo PATH] [--version]
        stage NAME [ARGS]... | stage --list     python -m stages.NAME ARGS (one DVC stage's entry point)
        stages                                  list the stages
        round [--no-deploy] [--no-push] [--host H] [--ports P,Q]
        release-lm [--no-commit] [--no-push] [--bootstrap]   freeze today's split as the next LM release
        promote                                 decide from the last dvc repro and promote
        bootstrap                               the empty models/deployed
        serve start [--host H] [--ports P,Q]    serve models/deployed
        serve stop
        labels promote                          python -m stages.refine_labels promote
        labels init [--force]                   the empty label overrides file
        check-repro OTHER [--same-machine]      python -m domainlm.common.reproducibility
        bench [NAME [ARGS]...] [--list]         python benchmarks/NAME.py ARGS

Every command but ``--help`` and ``--version`` works on a repository (the folder holding ``dvc.yaml`` and
``params.yaml``) and runs with its root as the current folder, since the package's paths are relative to it
(:mod:`domainlm.common.paths`). The root is ``--repo``, else ``$DOMAINLM_REPO``, else the nearest folder at or above
the current one that holds both files (:func:`find_repo`).

The round commands share :func:`domainlm.rounds.__main__.run_command` with ``python -m domainlm.rounds`` and keep its
exit codes; ``stage``, ``labels promote`` and ``bench`` run the entry point in a subprocess of the same interpreter
and exit with its status. :func:`help_pages` gives every command's ``--help`` as plain text, for the documentation.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from domainlm import __version__

REPO_MARKERS = ("dvc.yaml", "params.yaml")
REPO_ENV = "DOMAINLM_REPO"
HELP_WIDTH = 100
# benchmarks/*.py that other benchmarks import; not benchmarks themselves
BENCH_LIBRARIES = frozenset({"measure"})

# a sentence ends at a full stop before a capital letter ("Hu et al. 2021" goes on)
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")
# click wraps help at the terminal's width less 2 columns, at most max_content_width less 2: on a wide terminal, --help
# shows the pages of help_pages()
_SETTINGS = {"max_content_width": HELP_WIDTH + 2, "help_option_names": ["-h", "--help"]}


def _typer(**kwargs) -> typer.Typer:
    """A typer app with plain-text help (no Rich markup or colours), no shell-completion options and plain
    tracebacks."""
    return typer.Typer(
        rich_markup_mode=None,
        add_completion=False,
        pretty_exceptions_enable=False,
        no_args_is_help=True,
        context_settings=_SETTINGS,
        **kwargs,
    )


app = _typer(
    name="domainlm",
    help=(
        "The domain-LM pipeline's commands: one DVC stage, the daily round, the model server, the label overrides, "
        "the reproducibility check and the benchmarks.\n\n"
        "Commands run in the repository root: --repo, else $DOMAINLM_REPO, else the nearest folder at or above the "
        "current one that holds dvc.yaml and params.yaml. `dvc repro` runs the whole pipeline."
    ),
)
serve_app = _typer(
    help="Serve models/deployed, or stop the server.\n\n"
    "The server is `mlflow models serve` on one port of a blue/green pair (.cache/serve/server.json)."
)
labels_app = _typer(
    help="Write the label overrides.\n\n"
    "data/labels/overrides.parquet holds the id and label of documents whose label the split stage replaces."
)
app.add_typer(serve_app, name="serve")
app.add_typer(labels_app, name="labels")


# ---- the repository


class RepoNotFoundError(LookupError):
    """No repository root: the given folder, or no folder from the start upwards, holds ``dvc.yaml`` and
    ``params.yaml``."""


def is_repo(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding every file of :data:`REPO_MARKERS`."""
    return all((Path(path) / marker).is_file() for marker in REPO_MARKERS)


def find_repo(repo: str | os.PathLike | None = None, start: str | os.PathLike | None = None) -> Path:
    """The repository root, as an absolute path.

    Args:
        repo: an explicit root (``--repo``); when None, ``$DOMAINLM_REPO`` if set and not empty.
        start: where the upward search starts when neither is given (default: the current folder).

    Returns:
        ``repo`` (or ``$DOMAINLM_REPO``), resolved, when it holds :data:`REPO_MARKERS`; otherwise the nearest folder at
        or above ``start`` that holds them.

    Raises:
        RepoNotFoundError: the explicit root lacks a marker, or no folder from ``start`` to ``/`` has both. The
            message is one line and names ``--repo``.
    """
    markers = " and ".join(REPO_MARKERS)
    if repo is None:
        repo = os.environ.get(REPO_ENV) or None
        source = f"${REPO_ENV}"
    else:
        source = "--repo"
    if repo is not None:
        path = Path(repo).expanduser().resolve()
        missing = [marker for marker in REPO_MARKERS if not (path / marker).is_file()]
        if missing:
            raise RepoNotFoundError(f"{source} {path} is not a domainlm repository: it has no {' and '.join(missing)}")
        return path
    here = Path.cwd() if start is None else Path(start)
    here = here.expanduser().resolve()
    for folder in (here, *here.parents):
        if is_repo(folder):
            return folder
    raise RepoNotFoundError(
        f"no repository at or above {here} (no folder there holds {markers}); pass --repo PATH or set {REPO_ENV}"
    )


def _enter_repo(ctx: typer.Context) -> Path:
    """Find the root (:func:`find_repo` with the ``--repo`` option) and make it the current folder; on failure,
    print the one-line reason and exit 2."""
    try:
        root = find_repo((ctx.find_root().obj or {}).get("repo"))
    except RepoNotFoundError as exc:
        typer.echo(f"domainlm: {exc}", err=True)
        raise typer.Exit(2) from None
    os.chdir(root)
    return root


def _run(argv: Sequence[str], root: Path) -> int:
    """Run ``argv`` in ``root`` with ``root`` first on ``PYTHONPATH`` (its ``stages`` and ``domainlm`` are the ones
    imported); return its exit status, 128 + N for a process killed by signal N (as a shell reports it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(list(argv), cwd=root, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT from the terminal; let it finish its own way
        code = proc.wait()
    return 128 - code if code < 0 else code


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring (read without importing the module), without a leading
    ``name: `` (the stage docstrings' habit) and without reST markup."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = _SENTENCE_END.split(paragraph, maxsplit=1)[0].rstrip(".")
    sentence = re.sub(r"^[\w@<>]+: ", "", sentence)
    return re.sub(r":(?:mod|func|class|data):", "", sentence).replace("``", "")


def _print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max((len(name) for name, _ in rows), default=0) + 2
    for name, text in rows:
        lines = textwrap.wrap(text, max(HELP_WIDTH - width - 2, 40)) or [""]
        typer.echo(f"  {name:<{width}}{lines[0]}")
        for line in lines[1:]:
            typer.echo(" " * (width + 2) + line)


def stage_names(root: str | os.PathLike) -> list[str]:
    """The stages of a repository: the modules of ``<root>/stages/`` (``python -m stages.<name>``), sorted."""
    return sorted(p.stem for p in (Path(root) / "stages").glob("*.py") if not p.stem.startswith("_"))


def bench_names(root: str | os.PathLike) -> list[str]:
    """The benchmark scripts of a repository: ``<root>/benchmarks/*.py`` but :data:`BENCH_LIBRARIES`, sorted."""
    return sorted(
        p.stem
        for p in (Path(root) / "benchmarks").glob("*.py")
        if not p.stem.startswith("_") and p.stem not in BENCH_LIBRARIES
    )


def _check_name(ctx: typer.Context, kind: str, name: str, known: Sequence[str]) -> None:
    """Exit 2 with a usage error naming the known ones when ``name`` is not one of them."""
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    ctx.fail(f"unknown {kind} {name!r}{suggestion}; the {kind}s are: {', '.join(known)}")


# ---- the top level


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"domainlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    repo: Annotated[
        str | None,
        typer.Option(
            "--repo",
            metavar="PATH",
            help=f"The repository root (the folder holding dvc.yaml and params.yaml). Default: ${REPO_ENV} when set, "
            "else the nearest such folder at or above the current one.",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    ctx.obj = {"repo": repo}


# ---- stages


@app.command(context_settings={**_SETTINGS, "ignore_unknown_options": True, "allow_interspersed_args": False})
def stage(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="The stage: a module of stages/ (see --list).")
    ] = None,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARGS",
            help="The stage's own arguments, passed on as they are: the domain for train_lora, `promote` for "
            "refine_labels, `--help` for the stage's usage.",
        ),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the stages and exit.")] = False,
) -> None:
    """Run one DVC stage's entry point in the repository root.

    `python -m stages.NAME [ARGS]`: the command that dvc.yaml's `cmd` runs, but without DVC: nothing is checked
    against dvc.lock or recorded there. `dvc repro NAME` is the tracked way (`train_lora@law` for one domain of a
    foreach stage). Exits with the stage's status.
    """
    root = _enter_repo(ctx)
    known = stage_names(root)
    if list_:
        _list_stages(root)
        return
    if name is None:
        ctx.fail("Missing argument 'NAME'. `domainlm stages` lists the stages.")
    _check_name(ctx, "stage", name, known)
    raise typer.Exit(_run([sys.executable, "-m", f"stages.{name}", *(args or [])], root))


@app.command("stages")
def stages_(ctx: typer.Context) -> None:
    """List the stages, with what each does.

    The stages are the modules of stages/, one DVC entry point each; the text is the first sentence of each module's
    docstring.
    """
    _list_stages(_enter_repo(ctx))


def _list_stages(root: Path) -> None:
    _print_table([(name, _summary(root / "stages" / f"{name}.py")) for name in stage_names(root)])


# ---- the daily round and the model server


def _rounds(ctx: typer.Context, command: str, **options) -> None:
    from domainlm.rounds.__main__ import run_command

    _enter_repo(ctx)
    raise typer.Exit(run_command(command, **options))


HostOption = Annotated[str, typer.Option("--host", metavar="HOST", help="The address the model server listens on.")]
PortsOption = Annotated[str, typer.Option("--ports", metavar="PORT,PORT", help="The blue/green port pair.")]


@app.command("round")
def round_(
    ctx: typer.Context,
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="Do not restart the model server after a promotion.")
    ] = False,
    no_push: Annotated[bool, typer.Option("--no-push", help="Skip `dvc push` (no remote configured).")] = False,
    host: HostOption = "127.0.0.1",
    ports: PortsOption = "5077,5078",
) -> None:
    """Run the daily round, with a scheduler's exit codes.

    Lock, dvc repro, decide, promote, dvc push, git commit and tag, deploy (restart the model server).

    Exit status: 0 when the round finished (promoted, kept the champion, or had nothing new), 1 when a step failed,
    2 when the classifier's gate failed. The round's record is printed as one JSON line.
    """
    _rounds(ctx, "round", deploy=not no_deploy, push=not no_push, host=host, ports=ports)


@app.command("release-lm")
def release_lm(
    ctx: typer.Context,
    no_commit: Annotated[bool, typer.Option("--no-commit", help="Cut and dvc add only: no commit, no tag.")] = False,
    no_push: Annotated[bool, typer.Option("--no-push", help="Skip `dvc push` (no remote configured).")] = False,
    bootstrap: Annotated[
        bool, typer.Option("--bootstrap", help="A fresh clone: only when data/release is missing.")
    ] = False,
) -> None:
    """Freeze today's split as the next LM release.

    Runs `dvc repro split`, copies the split into data/release, `dvc add`s and pushes it, commits data/release.dvc
    and tags lm-release-N. The next `dvc repro` (or round) rebuilds the LM from it, and a classifier trained on the
    new LM enters as the challenger. With --bootstrap (where data/release is missing and the remote lacks it) it
    cuts release 1 without a commit or a push.
    """
    _rounds(ctx, "release-lm", commit=not no_commit, push=not no_push, bootstrap=bootstrap)


@app.command()
def promote(ctx: typer.Context) -> None:
    """Decide from the last dvc repro and promote the classifier.

    Reads metrics/classifier.json and, when the candidate wins, replaces models/deployed (`dvc add`). Runs no dvc
    repro, commit or tag. Prints the decision as one JSON line; exits 2 when the gate failed, 1 on an error, else 0.
    """
    _rounds(ctx, "promote")


@app.command()
def bootstrap(ctx: typer.Context) -> None:
    """Create the empty models/deployed when it is missing.

    Its only file is deployed.json with a null version: what a fresh clone whose DVC remote lacks models/deployed
    starts from.
    """
    _rounds(ctx, "bootstrap")


@serve_app.command("start")
def serve_start(ctx: typer.Context, host: HostOption = "127.0.0.1", ports: PortsOption = "5077,5078") -> None:
    """Serve models/deployed, restarting the server when it changed.

    A new models/deployed starts a new server on the other port of the pair; once it answers /ping, the old one is
    stopped. Prints the server state as one JSON line.
    """
    _rounds(ctx, "serve", host=host, ports=ports)


@serve_app.command("stop")
def serve_stop(ctx: typer.Context) -> None:
    """Stop the model server that `domainlm serve start` started."""
    _rounds(ctx, "stop")


# ---- label overrides


@labels_app.command("promote")
def labels_promote(ctx: typer.Context) -> None:
    """Write the refined labels to the label overrides.

    Runs `python -m stages.refine_labels promote`; older overrides are kept. Then `dvc add
    data/labels/overrides.parquet` and `dvc repro` apply them.
    """
    root = _enter_repo(ctx)
    raise typer.Exit(_run([sys.executable, "-m", "stages.refine_labels", "promote"], root))


@labels_app.command("init")
def labels_init(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing overrides file with the empty one.")
    ] = False,
) -> None:
    """Write the empty label overrides file.

    Columns id and label, no rows: what a fresh clone whose DVC remote lacks the file starts from. An existing file
    is left as it is unless --force.
    """
    from domainlm.common import paths

    _enter_repo(ctx)
    if paths.OVERRIDES_PATH.exists() and not force:
        typer.echo(f"{paths.OVERRIDES_PATH} exists; left as it is (--force replaces it)")
        return
    from domainlm.documents.labels import write_empty_overrides

    typer.echo(f"wrote {write_empty_overrides(paths.OVERRIDES_PATH)}")


# ---- reproducibility and benchmarks


@app.command("check-repro")
def check_repro(
    ctx: typer.Context,
    other: Annotated[
        Path, typer.Argument(metavar="OTHER", help="Another checkout, after its own `dvc repro`.", show_default=False)
    ],
    same_machine: Annotated[
        bool,
        typer.Option("--same-machine", help="Also require identical dvc.lock hashes of every data and model output."),
    ] = False,
) -> None:
    """Check the reproducibility promise against another checkout.

    Compares this repository's metrics/ and dvc.lock with OTHER's (domainlm.common.reproducibility). Prints one line
    per metric (within its tolerance or OFF) and a summary; exits 1 when the promise is broken.
    """
    other = other.expanduser().resolve()  # before the root becomes the current folder
    root = _enter_repo(ctx)
    from domainlm.common.reproducibility import check

    for checkout in (root, other):
        if not (checkout / "dvc.lock").is_file():
            typer.echo(f"domainlm: {checkout} has no dvc.lock: run `dvc repro` there first", err=True)
            raise typer.Exit(2)
    raise typer.Exit(check(root, other, same_machine=same_machine))


@app.command(context_settings={**_SETTINGS, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="The benchmark: a script of benchmarks/ (see --list).")
    ] = None,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARGS", help="The benchmark's own arguments, passed on (put them after `--` when one is --help)."
        ),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks and exit.")] = False,
) -> None:
    """Run one benchmark, or list them.

    `python benchmarks/NAME.py [ARGS]` in the repository root; with no NAME, the list. Each benchmark writes its
    figures under benchmarks/results/. Exits with the benchmark's status.
    """
    root = _enter_repo(ctx)
    known = bench_names(root)
    if list_ or name is None:
        _print_table([(n, _summary(root / "benchmarks" / f"{n}.py")) for n in known])
        return
    _check_name(ctx, "benchmark", name, known)
    raise typer.Exit(_run([sys.executable, str(Path("benchmarks") / f"{name}.py"), *(args or [])], root))


# ---- help as text


def help_pages() -> list[tuple[str, str]]:
    """Every command's ``--help``, as plain text at a width of :data:`HELP_WIDTH` columns.

    Returns:
        ``(command path, help text)`` pairs: ``("domainlm", ...)`` first, then each command in the order
        ``domainlm --help`` lists them, a group (``domainlm serve``) followed by its commands (``domainlm serve
        start``). The text has no ANSI escapes and does not depend on the terminal.
    """
    pages: list[tuple[str, str]] = []

    def visit(command, name: str, parent) -> None:
        ctx = command.make_context(
            name,
            [],
            parent=parent,
            resilient_parsing=True,
            terminal_width=HELP_WIDTH,
            max_content_width=HELP_WIDTH,
        )
        with ctx:
            pages.append((ctx.command_path, command.get_help(ctx)))
            for sub_name in getattr(command, "list_commands", lambda _ctx: [])(ctx):
                visit(command.get_command(ctx, sub_name), sub_name, ctx)

    visit(typer.main.get_command(app), "domainlm", None)
    return pages


def main() -> None:
    """The ``domainlm`` console script."""
    app(prog_name="domainlm")


if __name__ == "__main__":
    main()

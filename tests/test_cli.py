"""The ``domainlm`` command (domainlm.cli) and the stage entry points' own command lines
(domainlm.common.stage.parse_stage_args): ``--help`` everywhere, bad arguments rejected before a run is logged,
the repository root found from ``--repo``, ``$DOMAINLM_REPO`` or the current folder. No stage is run."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from domainlm import __version__, cli
from domainlm.common import paths

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
COMMANDS = {"stage", "stages", "round", "release-lm", "promote", "bootstrap", "check-repro", "bench", "serve", "labels"}
PAGES = {
    "domainlm",
    *(f"domainlm {c}" for c in COMMANDS),
    "domainlm serve start",
    "domainlm serve stop",
    "domainlm labels promote",
    "domainlm labels init",
}


def domainlm_command() -> list[str]:
    """The console script that `pip install -e .` (make setup) puts beside this interpreter."""
    script = Path(sys.executable).with_name("domainlm")
    assert script.is_file(), f"{script} is missing: `make setup` (pip install --no-deps --no-build-isolation -e .)"
    return [str(script)]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOMAINLM_REPO", "COLUMNS")}
    return {**env, **extra}


def domainlm(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*domainlm_command(), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def python_m(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def listed_commands(help_text: str) -> set[str]:
    """The names under ``Commands:`` in a click/typer help page."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()}


def fake_repo(root: Path) -> Path:
    """A folder that counts as a repository, with one stage and one benchmark that report where they ran."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("domains: []\n")
    (root / "stages").mkdir()
    (root / "stages" / "__init__.py").write_text("")
    report = "import json, os, sys\nprint(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:]}))\nsys.exit(3)\n"
    (root / "stages" / "echo.py").write_text('"""echo: print the folder and the arguments."""\n' + report)
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "hello.py").write_text('"""Say hello. Then exit 3."""\n' + report)
    (root / "benchmarks" / "measure.py").write_text('"""What the benchmarks share."""\n')
    return root


# ---- the console script and its help


def test_help_works_outside_a_repository_and_lists_every_command(tmp_path):
    top = domainlm("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("Usage: domainlm [OPTIONS] COMMAND")
    assert listed_commands(top.stdout) == COMMANDS
    assert "--repo" in top.stdout and "DOMAINLM_REPO" in top.stdout and "\x1b[" not in top.stdout
    assert listed_commands(domainlm("serve", "--help", cwd=tmp_path).stdout) == {"start", "stop"}
    assert listed_commands(domainlm("labels", "--help", cwd=tmp_path).stdout) == {"promote", "init"}
    for command in COMMANDS:  # a command's --help needs no repository either
        page = domainlm(command, "--help", cwd=tmp_path)
        assert page.returncode == 0 and page.stdout.startswith(f"Usage: domainlm {command} "), (command, page.stderr)


def test_version():
    out = domainlm("--version", cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"domainlm {__version__}"
    from importlib.metadata import version

    assert version("domainlm") == __version__  # pyproject.toml reads it from domainlm/__init__.py


def test_python_m_domainlm_is_the_same_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "domainlm", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and listed_commands(out.stdout) == COMMANDS


def test_help_pages_cover_every_command_as_plain_text_and_match_help(tmp_path):
    pages = cli.help_pages()
    assert [name for name, _ in pages][0] == "domainlm"
    assert {name for name, _ in pages} == PAGES and len(pages) == len(PAGES)
    for name, text in pages:
        assert text.startswith(f"Usage: {name} "), name
        assert "\x1b" not in text and max(len(line) for line in text.splitlines()) <= cli.HELP_WIDTH, name
        # click leaves 2 of the terminal's columns free: a terminal of HELP_WIDTH + 2 columns shows the same page
        shown = domainlm(*name.split()[1:], "--help", cwd=tmp_path, COLUMNS=str(cli.HELP_WIDTH + 2))
        assert shown.stdout.rstrip("\n") == text.rstrip("\n"), name


# ---- the repository root


def test_find_repo_from_option_env_or_the_folders_above(tmp_path, monkeypatch):
    repo = fake_repo(tmp_path / "repo")
    nested = repo / "data" / "raw"
    nested.mkdir(parents=True)
    monkeypatch.delenv("DOMAINLM_REPO", raising=False)
    assert cli.find_repo(start=nested) == repo.resolve()
    assert cli.find_repo(repo) == repo.resolve()
    monkeypatch.setenv("DOMAINLM_REPO", str(repo))
    assert cli.find_repo(start=tmp_path) == repo.resolve()
    monkeypatch.delenv("DOMAINLM_REPO")
    with pytest.raises(cli.RepoNotFoundError, match="no repository at or above .*--repo"):
        cli.find_repo(start=tmp_path)
    (repo / "params.yaml").unlink()
    with pytest.raises(cli.RepoNotFoundError, match=r"--repo .* has no params\.yaml$"):
        cli.find_repo(repo)


def test_commands_run_in_the_root_found_from_option_env_or_cwd(tmp_path):
    repo = fake_repo(tmp_path / "repo")
    nested = repo / "data"
    nested.mkdir()
    for how in (
        {"args": ("--repo", str(repo)), "cwd": tmp_path, "env": {}},
        {"args": (), "cwd": tmp_path, "env": {"DOMAINLM_REPO": str(repo)}},
        {"args": (), "cwd": nested, "env": {}},
    ):
        out = domainlm(*how["args"], "stage", "echo", "law", "--flag", cwd=how["cwd"], **how["env"])
        assert out.returncode == 3, (how, out.stderr)  # the stage's own exit status
        assert json.loads(out.stdout) == {"cwd": str(repo.resolve()), "argv": ["law", "--flag"]}, how


def test_outside_a_repository_a_command_fails_with_one_line_naming_repo(tmp_path):
    out = domainlm("stages", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--repo" in out.stderr and str(tmp_path) in out.stderr
    not_repo = domainlm("--repo", str(tmp_path), "bench", cwd=ROOT)
    assert not_repo.returncode == 2 and "--repo" in not_repo.stderr and "dvc.yaml" in not_repo.stderr


# ---- stage and bench


def test_stage_list_names_every_stage_module():
    listing = domainlm("stages", cwd=ROOT)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines() if line[2] != " "] == STAGES
    assert domainlm("stage", "--list", cwd=ROOT).stdout == listing.stdout
    assert "  corpus  " in listing.stdout and "write data/raw/<domain>.jsonl" in listing.stdout


def test_unknown_stage_fails_with_the_known_ones(tmp_path):
    out = domainlm("--repo", str(ROOT), "stage", "nosuch", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown stage 'nosuch'" in out.stderr and "train_lora" in out.stderr
    typo = domainlm("--repo", str(ROOT), "stage", "corpsu", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean 'corpus'" in typo.stderr
    missing = domainlm("--repo", str(ROOT), "stage", cwd=tmp_path)
    assert missing.returncode == 2 and "Missing argument 'NAME'" in missing.stderr


def test_stage_passes_help_to_the_stage_itself():
    out = domainlm("stage", "train_lora", "--help", cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m stages.train_lora [-h] domain")


def test_bench_lists_the_benchmark_scripts_but_not_their_library():
    out = domainlm("bench", cwd=ROOT)
    assert out.returncode == 0
    names = {line.split()[0] for line in out.stdout.splitlines() if line[2] != " "}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"measure"}
    assert names == scripts and scripts
    assert domainlm("bench", "--list", cwd=ROOT).stdout == out.stdout
    assert "Benchmark the dedup stage" in out.stdout  # each script's first docstring sentence


def test_bench_runs_a_script_in_the_root_with_its_arguments(tmp_path):
    repo = fake_repo(tmp_path)
    listing = domainlm("bench", cwd=repo)
    assert listing.stdout == "  hello  Say hello\n"
    out = domainlm("bench", "hello", "--rounds", "2", cwd=repo / "stages")
    assert out.returncode == 3 and json.loads(out.stdout) == {"cwd": str(repo.resolve()), "argv": ["--rounds", "2"]}
    unknown = domainlm("bench", "measure", cwd=repo)
    assert unknown.returncode == 2 and "unknown benchmark 'measure'" in unknown.stderr


# ---- the stage entry points' own command lines


@pytest.mark.parametrize("stage", ["corpus", "train_lora"])
def test_stage_module_help_exits_0_without_logging_a_run(stage, tmp_path):
    out = python_m(f"stages.{stage}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m stages.{stage} ")
    assert stage in out.stdout.split("\n\n")[1]  # the description is the module docstring
    assert not (tmp_path / paths.RUN_LOG).exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("stage", "args", "message"),
    [
        ("corpus", ["--bogus"], "unrecognized arguments: --bogus"),
        ("train_lora", [], "the following arguments are required: domain"),
        ("train_lora", ["law", "faq"], "unrecognized arguments: faq"),
        ("refine_labels", ["demote"], "invalid choice: 'demote'"),
    ],
)
def test_stage_module_rejects_arguments_it_does_not_take(stage, args, message, tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    out = python_m(f"stages.{stage}", *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_main_answers_help_in_process(stage, tmp_path, monkeypatch, capsys):
    """main(argv) parses argv, never sys.argv (pytest's own arguments here), and stops before stage_run."""
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m stages.{stage} ")
    with pytest.raises(SystemExit) as bad:
        module.main(["--no-such-option"])
    assert bad.value.code == 2
    assert not (tmp_path / "logs").exists()


# ---- the commands that write


def test_labels_init_writes_the_committed_empty_overrides_and_keeps_an_existing_file(tmp_path):
    repo = fake_repo(tmp_path)
    out = domainlm("labels", "init", cwd=repo)
    assert out.returncode == 0, out.stderr
    written = (repo / paths.OVERRIDES_PATH).read_bytes()
    pointer = (ROOT / f"{paths.OVERRIDES_PATH}.dvc").read_text()
    assert f"md5: {hashlib.md5(written).hexdigest()}" in pointer  # byte-identical to the committed file
    (repo / paths.OVERRIDES_PATH).write_bytes(b"kept")
    assert domainlm("labels", "init", cwd=repo).returncode == 0
    assert (repo / paths.OVERRIDES_PATH).read_bytes() == b"kept"
    assert domainlm("labels", "init", "--force", cwd=repo).returncode == 0
    assert (repo / paths.OVERRIDES_PATH).read_bytes() == written


def test_bootstrap_shares_the_rounds_implementation(tmp_path):
    repo = fake_repo(tmp_path)
    out = domainlm("bootstrap", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert json.loads((repo / paths.DEPLOYED_DIR / "deployed.json").read_text()) == {"version": None}
    from domainlm.rounds.__main__ import run_command

    with pytest.raises(ValueError, match="unknown command 'nosuch'"):
        run_command("nosuch")


def test_check_repro_needs_dvc_lock_in_both_checkouts(tmp_path):
    repo = fake_repo(tmp_path / "repo")
    out = domainlm("check-repro", str(ROOT), cwd=repo)
    assert out.returncode == 2 and "has no dvc.lock" in out.stderr and str(repo.resolve()) in out.stderr

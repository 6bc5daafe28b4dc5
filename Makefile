# `make` lists the targets. Two entry points (see README): `make repro` runs the whole pipeline on the bundled
# corpus, `make test` runs the test suite. Each builds its virtualenv (with the `domainlm` command installed) and,
# when run as root, installs the Debian packages it needs, so both work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
# pip installs without byte-compiling every file (--no-compile: 60 s instead of 116 s for requirements.txt on a
# 2-core machine, pip cache warm); Python then writes the .pyc of the modules the pipeline imports on their first
# import (+9 s once for torch, transformers, mlflow, ...). An inherited PYTHONDONTWRITEBYTECODE would make every
# stage compile its imports again, so it is cleared here (an empty value counts as unset).
export PYTHONDONTWRITEBYTECODE :=
PIP := $(BIN)/python -m pip install -q --progress-bar off --no-compile
# An index to install torch from before requirements.txt, e.g. `make setup
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`: pip's default index serves the CUDA build of torch (several
# GB of CUDA packages). Unset, torch comes with requirements.txt from pip's configured indexes.
TORCH_INDEX_URL ?=
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
# apt packages: dpkg tools unpack the corpus .debs; redis-server backs the Redis LSH tests; g++ and
# python3-dev let DeepSpeed JIT-build its CPU ops (ninja comes from requirements.txt).
APT_PACKAGES := dpkg redis-server g++ python3-dev

.PHONY: help repro test bench setup setup-test setup-dev apt dag lint format docs clean-venv round release-lm serve serve-stop

help: ## List the targets (this text)
	@echo "make TARGET, where TARGET is one of:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

repro: setup data/labels/overrides.parquet models/deployed/deployed.json data/release/release.json ## Run the whole pipeline (dvc repro)
	dvc repro

# The daily round (docs/guides/daily-round.md): lock, dvc repro, decide, promote, dvc push, commit, tag, deploy.
# make exits 2 on any failure; schedulers call `domainlm round` (or `python -m domainlm.rounds round`) for its own
# codes (0 / 1 / 2).
round: setup data/labels/overrides.parquet models/deployed/deployed.json data/release/release.json ## One daily round (domainlm round)
	domainlm round

# The LM release (docs/guides/daily-round.md): freeze today's split into data/release, dvc add, push, commit, tag
# lm-release-N. The next round rebuilds the LM from it; its classifier enters as the challenger.
release-lm: setup data/labels/overrides.parquet models/deployed/deployed.json data/release/release.json ## Cut the next LM release (domainlm release-lm)
	domainlm release-lm

# Blue/green ports 5077/5078, see .cache/serve/server.json.
serve: setup models/deployed/deployed.json ## Serve models/deployed with mlflow models serve
	domainlm serve start

serve-stop: setup ## Stop the model server
	domainlm serve stop

# The label overrides are a `dvc add`-ed file that starts empty. A fresh clone has only its .dvc
# pointer: pull it from the remote, or, where the remote does not have it yet, write the empty
# file (byte-identical to the committed one).
data/labels/overrides.parquet:
	dvc pull -q $@.dvc 2>/dev/null || domainlm labels init

# The deployed classifier is a `dvc add`-ed folder too (models/deployed.dvc). A fresh clone whose remote does not
# have it gets the bootstrap folder: only deployed.json = {"version": null}, byte-identical to the committed one.
models/deployed/deployed.json:
	dvc pull -q models/deployed.dvc 2>/dev/null || domainlm bootstrap

# The LM release is a `dvc add`-ed folder as well (data/release.dvc). A fresh clone whose remote lacks it cuts
# release 1 from the bundled corpus's split (dvc repro split first): the same bytes as the committed release.
data/release/release.json:
	dvc pull -q data/release.dvc 2>/dev/null || domainlm release-lm --bootstrap

test: setup-test data/labels/overrides.parquet models/deployed/deployed.json ## Run the test suite (pytest)
	python -m pytest tests -ra --durations=15

bench: setup-test ## Run the benchmarks (`domainlm bench` lists them all)
	domainlm bench dedup_quality
	domainlm bench dedup_scale
	domainlm bench io_speed
	domainlm bench lora_vs_full
	domainlm bench label_noise
	domainlm bench real_shape
	domainlm bench serve_load
	domainlm bench ray_floor

dag: setup ## Print the pipeline's stage graph (dvc dag)
	dvc dag

lint: setup-dev ## Check the code with ruff (lint rules and format)
	ruff check .
	ruff format --check .

format: setup-dev ## Format the code and apply ruff's safe fixes
	ruff check --fix .
	ruff format .

# The two variables silence the end-of-life banners that mkdocs-material and a plugin print on every build.
docs: setup-dev ## Build the documentation site into site/ (mkdocs build --strict)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true mkdocs build --strict

setup: apt $(VENV)/.installed ## The virtualenv: requirements.txt and the domainlm package (editable)
setup-test: apt $(VENV)/.installed-test ## setup, plus requirements-test.txt
setup-dev: apt $(VENV)/.installed-dev ## setup-test, plus requirements-dev.txt (ruff, mkdocs, pre-commit)

# The package is installed editable without build isolation: its build backend (hatchling) comes from
# requirements.txt, so the install needs no index.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_INDEX_URL)" ]; then \
	  $(PIP) --index-url "$(TORCH_INDEX_URL)" torch==$(TORCH_VERSION) > $(VENV)/pip-torch.log 2>&1 || { cat $(VENV)/pip-torch.log; exit 1; }; \
	fi
	$(PIP) -r requirements.txt > $(VENV)/pip.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip.log; exit 1; }
	$(PIP) --no-deps --no-build-isolation -e . >> $(VENV)/pip.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip.log; exit 1; }
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) -r requirements-test.txt > $(VENV)/pip-test.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip-test.log; exit 1; }
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-test requirements-dev.txt
	$(PIP) -r requirements-dev.txt > $(VENV)/pip-dev.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip-dev.log; exit 1; }
	touch $@

# apt-get update also refreshes the lists that `apt-get download` needs to fetch the corpus .debs.
apt: ## Install the Debian packages (as root; otherwise warn about missing ones)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq >/dev/null; \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else \
	  for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo "warning: Debian package $$p is missing; install it as root (apt-get install $$p)"; done; \
	fi

clean-venv: ## Remove the virtualenv
	rm -rf $(VENV)

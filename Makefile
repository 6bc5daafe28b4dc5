# Two entry points (see README): `make repro` runs the whole pipeline on the bundled corpus,
# `make test` runs the test suite. Each builds its virtualenv and, when run as root, installs
# the Debian packages it needs, so both work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
# pip installs without byte-compiling every file (--no-compile: 60 s instead of 116 s for requirements.txt on the
# 2-core box, pip cache warm); Python then writes the .pyc of the modules the pipeline imports on their first
# import (+9 s once for torch, transformers, mlflow, ...). An inherited PYTHONDONTWRITEBYTECODE would make every
# stage compile its imports again, so it is cleared here (an empty value counts as unset).
export PYTHONDONTWRITEBYTECODE :=
PIP := $(BIN)/python -m pip install -q --progress-bar off --no-compile
# apt packages: dpkg tools unpack the corpus .debs; redis-server backs the Redis LSH tests; g++ and
# python3-dev let DeepSpeed JIT-build its CPU ops (ninja comes from requirements.txt).
APT_PACKAGES := dpkg redis-server g++ python3-dev

.PHONY: repro test bench setup setup-test apt dag clean-venv round serve serve-stop

repro: setup data/labels/overrides.parquet models/deployed/deployed.json
	dvc repro

# The daily round (README "A day in production"): lock, dvc repro, decide, promote, dvc push, commit, tag, deploy.
# make exits 2 on any failure; schedulers call `python -m domainlm.rounds round` for its own codes (0 / 1 / 2).
round: setup data/labels/overrides.parquet models/deployed/deployed.json
	python -m domainlm.rounds round

# Serve models/deployed with `mlflow models serve` (blue/green ports 5077/5078, see .cache/serve/server.json).
serve: setup models/deployed/deployed.json
	python -m domainlm.rounds serve

serve-stop: setup
	python -m domainlm.rounds stop

# The label overrides are a `dvc add`-ed file that starts empty. A fresh clone has only its .dvc
# pointer: pull it from the remote, or, where the remote does not have it yet, write the empty
# file (byte-identical to the committed one).
data/labels/overrides.parquet:
	dvc pull -q $@.dvc 2>/dev/null || python -c "from domainlm.documents.labels import write_empty_overrides; write_empty_overrides()"

# The deployed classifier is a `dvc add`-ed folder too (models/deployed.dvc). A fresh clone whose remote does not
# have it gets the bootstrap folder: only deployed.json = {"version": null}, byte-identical to the committed one.
models/deployed/deployed.json:
	dvc pull -q models/deployed.dvc 2>/dev/null || python -m domainlm.rounds bootstrap

test: setup-test data/labels/overrides.parquet models/deployed/deployed.json
	python -m pytest tests -ra --durations=15

bench: setup-test
	python benchmarks/dedup_quality.py
	python benchmarks/dedup_scale.py
	python benchmarks/io_speed.py
	python benchmarks/lora_vs_full.py
	python benchmarks/label_noise.py
	python benchmarks/real_shape.py
	python benchmarks/serve_load.py
	python benchmarks/ray_floor.py

dag: setup
	dvc dag

setup: apt $(VENV)/.installed
setup-test: apt $(VENV)/.installed-test

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt > $(VENV)/pip.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip.log; exit 1; }
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) -r requirements-test.txt > $(VENV)/pip-test.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip-test.log; exit 1; }
	touch $@

# apt-get update also refreshes the lists that `apt-get download` needs to fetch the corpus .debs.
apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq >/dev/null; \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else \
	  for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo "warning: Debian package $$p is missing; install it as root (apt-get install $$p)"; done; \
	fi

clean-venv:
	rm -rf $(VENV)

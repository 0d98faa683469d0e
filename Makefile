# Staged Flowers-102 study. Every stage target skips its work when its cached outputs are valid.
# `make help` lists the targets and variables: a `## ` comment after a target's colon describes it,
# and a `## ` line above a variable describes that variable.

## TOML study config (see docs/configuration.md)
CONFIG ?= configs/default.toml
## folder holding flowers-102/ (or that folder itself); only read, never written
DATA_DIR ?=
## auto, cpu, cuda, cuda:N or mps
DEVICE ?=
## space-separated section.key=value overrides, e.g. SET='finetune.epochs=5 heads.fit_on="train+val"'
SET ?=
## run every trained arm N times (seeds seed, seed+1, ...); the report adds mean ± sd
SEEDS ?=
## features, finetune, cnn, all: N processes under torchrun (DistributedDataParallel)
NPROC ?=
## the bench's own flags, e.g. BENCH_ARGS="--images 512 --rows compute,warm"
BENCH_ARGS ?=
## the stage `make invalidate` drops
STAGE ?=
## image files or folders for `make predict`
IMG ?=
## the arm `make predict` uses (default: the best on val)
ARM ?=
## where make test-quick puts its temporary folders (default: /dev/shm where writable; empty turns it off)
TEST_TMPDIR ?= $(shell test -d /dev/shm -a -w /dev/shm && echo /dev/shm)
## the virtual environment `make install` creates
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Paths are quoted so folders with spaces or shell characters reach the pipeline intact.
ARGS = --config '$(CONFIG)' $(if $(DATA_DIR),--data-dir '$(DATA_DIR)') $(if $(DEVICE),--device '$(DEVICE)') \
       $(if $(SEEDS),--set 'runtime.seeds=$(SEEDS)') $(foreach setting,$(SET),--set '$(setting)')

# A bad process count fails here in one line, before torchrun would print a traceback.
ifneq ($(strip $(NPROC)),)
ifeq ($(shell printf '%s' '$(NPROC)' | grep -Ex '[1-9][0-9]{0,3}'),)
$(error error: NPROC=$(NPROC) is not a positive whole number; use e.g. NPROC=2, or leave it unset for one process)
endif
endif

.PHONY: install all demo download samples features heads finetune cnn curves report test test-quick lint check-real clean invalidate config predict bench help

install: $(INSTALLED) ## create .venv and install the project with its offline, onnx and dev extras

# torch/torchvision are pinned to the builds this machine keeps on disk (see pyproject.toml).
$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[offline,onnx,dev]"
	touch $@

all: $(INSTALLED) ## every stage in order, each skipping when cached, then print the results table
	$(LAUNCH) stages.all $(ARGS)

# The demo's own config, data and cache root: it never reads or writes the study's cache folders.
DEMO_CONFIG := configs/demo.toml
DEMO_ARGS = --config $(DEMO_CONFIG) $(if $(DEVICE),--device '$(DEVICE)') $(if $(SEEDS),--set 'runtime.seeds=$(SEEDS)') \
            $(foreach setting,$(SET),--set '$(setting)')

demo: $(INSTALLED) ## the whole study in a few minutes on a generated dataset, nothing downloaded (cache/demo/)
	$(PYTHON) -m stages.demo_data $(DEMO_ARGS)
	$(PYTHON) -m stages.all $(DEMO_ARGS)
	@echo "demo: everything above lives under the demo config's cache root ($(if $(SET),as SET moved it,cache/demo/));" \
	      "for the real study: make all CONFIG=configs/offline.toml DATA_DIR=<folder holding flowers-102/>"

# NPROC > 1 launches N processes on this machine with torchrun (gloo on CPU, nccl on GPUs).
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m,$(PYTHON) -m)

download: $(INSTALLED) ## locate (DATA_DIR) or download Flowers-102 and verify it
samples: $(INSTALLED) ## sample grid, dataset sizes per split and class, class-distribution chart
features: $(INSTALLED) ## frozen backbone features of every image, cached in HDF5
heads: $(INSTALLED) ## softmax and logistic heads on the cached features
finetune: $(INSTALLED) ## fine-tune each pretrained backbone end to end
cnn: $(INSTALLED) ## the BN-CNN trained from scratch
curves: $(INSTALLED) ## label-efficiency curves: every frozen arm (end-to-end ones with [curves] end_to_end) at 1, 2, 5, 10 labelled images per class
report: $(INSTALLED) ## merge every arm's metrics and timings into one report
download samples features heads finetune cnn curves report:
	$(LAUNCH) stages.$@ $(ARGS)

# make predict IMG=path/to/photo.jpg [ARM=frozen-efficientnet-lite0-logistic]: top-5 classes per image.
predict: $(INSTALLED) ## IMG=<files or folders> [ARM=<arm>]: top-5 class names per image
	@test -n "$(IMG)" || { echo "make predict needs IMG=<image file or folder>" >&2; exit 2; }
	$(PYTHON) -m stages.predict $(ARGS) $(if $(ARM),--arm '$(ARM)') $(foreach image,$(IMG),'$(image)')

# Speed against the compute limit and the notebook's protocol, side by side (cache/bench/bench.json).
# BENCH_ARGS= passes the bench's own flags, e.g. BENCH_ARGS="--images 512 --rows compute,warm".
bench: $(INSTALLED) ## speed against the hardware limit and the notebook's protocol (docs/benchmarks.md)
	$(PYTHON) -m stages.bench $(ARGS) $(BENCH_ARGS)

config: $(INSTALLED) ## validate the config and print it resolved
	$(PYTHON) -m stages.config $(ARGS)

invalidate: $(INSTALLED) ## STAGE=<name>: drop that stage's outputs; it and its dependents rebuild
	@test -n "$(STAGE)" || { echo "make invalidate needs STAGE=<name>, e.g. make invalidate STAGE=heads" >&2; exit 2; }
	$(PYTHON) -m stages.invalidate $(ARGS) '$(STAGE)'

lint: $(INSTALLED) ## ruff: the lint rules in pyproject.toml and the formatting, on the whole tree (no files changed)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: $(INSTALLED) ## the whole test suite (offline, CPU)
	$(PYTHON) -m pytest -q

test-quick: $(INSTALLED) ## the tests not marked slow, subprocess, distributed or real_data: the edit loop, under a minute
	$(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR) )$(PYTHON) -m pytest -q -m "not slow and not subprocess and not distributed and not real_data"

# make check-real DATA_DIR=<folder holding flowers-102/>: checks on a real copy with the real offline weights.
check-real: $(INSTALLED) ## DATA_DIR=<folder>: checks on a real Flowers-102 copy with the real offline weights
	@if [ -z "$(DATA_DIR)" ]; then echo "make check-real: skipped, it needs DATA_DIR=<folder holding flowers-102/>"; \
	else FLOWERS_DATA_DIR="$(DATA_DIR)" $(PYTHON) -m pytest -q -rs tests/test_real_data.py; fi

clean: ## drop everything in cache/
	rm -rf cache/*/

help: ## list the targets and variables (this text)
	@echo "Targets (make <target> [VARIABLE=value ...]):"
	@awk -F ':[^#]*## ' '/^[a-z][a-z-]*:[^=]*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables:"
	@awk '/^## / {doc = substr($$0, 4); next} \
	     doc != "" && /^[A-Z_]+ \?=/ {split($$0, part, " \\?= *"); printf "  %-12s %s%s\n", part[1], doc, \
	         (part[2] != "" && part[2] !~ /\$$/ ? " (default: " part[2] ")" : ""); doc = ""; next} {doc = ""}' $(MAKEFILE_LIST)

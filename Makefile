# Staged Flowers-102 study. Every stage target skips its work when its cached outputs are valid.
#   make all                      run the whole study (installs first if needed)
#   make test                     run the test suite (offline, CPU)
#   make test-quick               the quick tests only, for the edit loop (under a minute)
#   make check-real DATA_DIR=...  checks on a real Flowers-102 copy with the real offline weights
# Variables: CONFIG=configs/default.toml  DATA_DIR=<folder holding flowers-102/>  DEVICE=auto|cpu|cuda
#            SET="section.key=value ..."  (per-run setting overrides)  STAGE=<name> (for invalidate)
#            SEEDS=N  (run every trained arm once per seed; the report adds mean ± sd)
#            NPROC=N  (features, finetune, cnn, all: N processes under torchrun, DistributedDataParallel)

CONFIG ?= configs/default.toml
DATA_DIR ?=
DEVICE ?=
SET ?=
SEEDS ?=
NPROC ?=
BENCH_ARGS ?=
STAGE ?=
IMG ?=
ARM ?=
# Where make test-quick puts its temporary folders: memory where writable (this disk's fsync and unlink took ~15 s a run).
TEST_TMPDIR ?= $(shell test -d /dev/shm -a -w /dev/shm && echo /dev/shm)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
ARGS = --config $(CONFIG) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(DEVICE),--device $(DEVICE)) \
       $(if $(SEEDS),--set runtime.seeds=$(SEEDS)) $(foreach setting,$(SET),--set '$(setting)')

.PHONY: install all download samples features heads finetune cnn report test test-quick check-real clean invalidate config predict bench

install: $(INSTALLED)

# torch/torchvision are pinned to the builds this machine keeps on disk (see pyproject.toml).
$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[offline,dev]"
	touch $@

all: $(INSTALLED)
	$(LAUNCH) stages.all $(ARGS)

# NPROC > 1 launches N processes on this machine with torchrun (gloo on CPU, nccl on GPUs).
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m,$(PYTHON) -m)

download samples features heads finetune cnn report: $(INSTALLED)
	$(LAUNCH) stages.$@ $(ARGS)

# make predict IMG=path/to/photo.jpg [ARM=frozen-efficientnet-lite0-logistic]: top-5 classes per image.
predict: $(INSTALLED)
	@test -n "$(IMG)" || { echo "make predict needs IMG=<image file or folder>" >&2; exit 2; }
	$(PYTHON) -m stages.predict $(ARGS) $(if $(ARM),--arm $(ARM)) $(IMG)

# Speed against the compute limit and the notebook's protocol, side by side (cache/bench/bench.json).
# BENCH_ARGS= passes the bench's own flags, e.g. BENCH_ARGS="--images 512 --rows compute,warm".
bench: $(INSTALLED)
	$(PYTHON) -m stages.bench $(ARGS) $(BENCH_ARGS)

config: $(INSTALLED)
	$(PYTHON) -m stages.config $(ARGS)

invalidate: $(INSTALLED)
	@test -n "$(STAGE)" || { echo "make invalidate needs STAGE=<name>, e.g. make invalidate STAGE=heads" >&2; exit 2; }
	$(PYTHON) -m stages.invalidate $(ARGS) $(STAGE)

test: $(INSTALLED)
	$(PYTHON) -m pytest -q

# make test-quick: every test not marked slow, subprocess, distributed or real_data (pyproject.toml), under a minute.
test-quick: $(INSTALLED)
	$(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR) )$(PYTHON) -m pytest -q -m "not slow and not subprocess and not distributed and not real_data"

# make check-real DATA_DIR=<folder holding flowers-102/>: checks on a real copy with the real offline weights.
check-real: $(INSTALLED)
	@if [ -z "$(DATA_DIR)" ]; then echo "make check-real: skipped, it needs DATA_DIR=<folder holding flowers-102/>"; \
	else FLOWERS_DATA_DIR="$(DATA_DIR)" $(PYTHON) -m pytest -q -rs tests/test_real_data.py; fi

clean:
	rm -rf cache/*/

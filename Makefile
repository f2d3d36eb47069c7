# Each target makes its own virtual environment (.venv) and installs what it needs:
# torch 2.13.0's CPU build first, so nothing pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# more `fewchips train` flags for the demo (tests/test_readme.py runs it with --steps 20)
DEMO_FLAGS ?=

.PHONY: demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the CPU build: from a local wheel or mirror pip already knows, else PyTorch's CPU index (Linux, Windows);
	@# macOS builds on PyPI are CPU builds
	if [ "$$(uname)" = Darwin ]; then $(PY) -m pip install -q torch==2.13.0; \
	else $(PY) -m pip install -q torch==2.13.0+cpu 2>/dev/null \
	  || $(PY) -m pip install -q torch==2.13.0+cpu --extra-index-url $(TORCH_CPU_INDEX); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed   # train tiny on the Python stdlib (4-16 min on 2 CPU cores), then sample from it
	$(VENV)/bin/fewchips train --preset tiny --out $(OUT) --overwrite $(DEMO_FLAGS)
	$(PY) -m fewchips.demo $(OUT)

test: lint $(VENV)/.installed # everything CI runs: the linter, then the tests (~8 min on 2 cores)
	$(PY) -m pytest -q -x

lint: $(VENV)/.installed      # ruff (pyproject.toml: pyflakes, pycodestyle, 120 columns)
	$(VENV)/bin/ruff check .

test-fast: $(VENV)/.installed # the edit loop: no slow or multi-process tests, about a minute
	$(PY) -m pytest -q -x -m "not slow and not multiprocess"

clean:
	rm -rf $(VENV) runs

# Each target makes its own virtual environment (.venv) and installs what it needs:
# torch 2.13.0 (CPU wheel) first, so nothing pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed   # train tiny on the Python stdlib (4-16 min on 2 CPU cores), then sample from it
	$(VENV)/bin/fewchips train --preset tiny --out $(OUT) --overwrite
	$(PY) -m fewchips.demo $(OUT)

test: lint $(VENV)/.installed # everything CI runs: the linter, then the tests (~8 min on 2 cores)
	$(PY) -m pytest -q -x

lint: $(VENV)/.installed      # ruff (pyproject.toml: pyflakes, pycodestyle, 120 columns)
	$(VENV)/bin/ruff check .

test-fast: $(VENV)/.installed # the edit loop: no slow or multi-process tests, about a minute
	$(PY) -m pytest -q -x -m "not slow and not multiprocess"

clean:
	rm -rf $(VENV) runs

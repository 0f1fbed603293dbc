# The two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch for dargmin.torch: 2.13.0 is the CPU build (a range would fetch a CUDA build of
	# several GB; GPU users: see the README's PyTorch section).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,plot,torch]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks conftest.py docs/_ext
	$(PY) -m ruff format --check src tests examples benchmarks conftest.py docs/_ext
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --dist worksteal -q --durations=25

# The documentation site (mkdocs-material + mkdocstrings), built into site/.
docs: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks conftest.py docs/_ext
	$(PY) -m ruff format --check src tests examples benchmarks conftest.py docs/_ext
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format src tests examples benchmarks conftest.py docs/_ext
	$(PY) -m ruff check --fix src tests examples benchmarks conftest.py docs/_ext

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/implicit_vs_peers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site

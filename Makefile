# The two commands of the README: `make demo` and `make test`. Both set up ./.venv first.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(VENV)/bin/dax demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m pip install --quiet -e '.[bench]'
	$(VENV)/bin/python benchmarks/synth.py
	$(VENV)/bin/python benchmarks/ingest.py
	$(VENV)/bin/python benchmarks/nightly.py
	$(VENV)/bin/python benchmarks/startup.py
	$(VENV)/bin/python benchmarks/pretrain.py
	$(VENV)/bin/python benchmarks/heads.py --quick

clean:
	rm -rf dax-home .pytest_cache

# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test setup check-clean check-export check-readme nbtest pytest export clean-nbs readme bench

setup: $(STAMP)

# Re-installs only when the dependency list changes. torch is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gpt2_demo.train --demo

test: $(STAMP) check-clean check-export check-readme nbtest pytest
	@echo "make test: all checks passed."

check-clean: $(STAMP)
	@PATH="$(abspath $(BIN)):$$PATH" bash .ci/check_sync.sh clean

check-export: $(STAMP)
	@PATH="$(abspath $(BIN)):$$PATH" bash .ci/check_sync.sh export

check-readme: $(STAMP)
	@PATH="$(abspath $(BIN)):$$PATH" bash .ci/check_sync.sh readme

# Two notebooks at a time, one thread each: on a 2-core machine, two processes with two threads each
# oversubscribe the cores and run many times slower.
# Both run with their own TMPDIR, removed when they end (pass or fail): the notebooks' and tests' temporary
# models and corpora (half a gigabyte per run) do not pile up in /tmp.
nbtest: $(STAMP)
	@t=$$(mktemp -d) && trap 'rm -rf "$$t"' EXIT && set -x && \
	  TMPDIR="$$t" OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing

pytest: $(STAMP)
	@t=$$(mktemp -d) && trap 'rm -rf "$$t"' EXIT && set -x && \
	  TMPDIR="$$t" $(BIN)/python -m pytest -q tests

# Developer helpers
export: $(STAMP)
	$(BIN)/nbdev-export

clean-nbs: $(STAMP)
	$(BIN)/nbdev-clean

readme: $(STAMP)
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --output-dir . --output README nbs/index.ipynb

bench: $(STAMP)
	$(BIN)/python -m gpt2_demo.bench train
	$(BIN)/python -m gpt2_demo.bench generate

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test lint bench clean

# The dev/CI install pins torch through constraints.txt (a CPU build); pyproject keeps torch>=2.4.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev,recipes]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check statplug recipes tests benchmarks
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no test: make fails on any non-zero exit, so CI fails too.
test: venv lint
	$(VENV)/bin/pytest -q

# bash with pipefail: a failed fit must fail the demo, not hand `tee`'s status to make.
demo: SHELL := /bin/bash
demo: .SHELLFLAGS := -eu -o pipefail -c
demo: venv
	mkdir -p demo_out
	cd demo_out && ../$(VENV)/bin/statplug fit tabular trainer=ddp-cpu-2 | tee fit.log
	cd demo_out && ../$(VENV)/bin/statplug inspect "$$(tail -n 1 fit.log)"

bench: venv
	$(PY) benchmarks/update.py
	$(PY) benchmarks/rl_step.py
	$(PY) benchmarks/norm_vs_peers.py
	# sync.py without --quick syncs one 50M-feature stat: several GB per rank
	$(PY) benchmarks/sync.py --quick
	$(PY) benchmarks/fit_overhead.py
	$(PY) benchmarks/quantiles.py

clean:
	rm -rf $(VENV) demo_out

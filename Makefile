VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check statplug tests benchmarks
	$(VENV)/bin/mypy

test: venv lint
	$(VENV)/bin/pytest -q

demo: venv
	cd demo_out 2>/dev/null || mkdir -p demo_out
	cd demo_out && ../$(VENV)/bin/statplug fit tabular trainer=ddp-cpu-2 | tee fit.log
	cd demo_out && ../$(VENV)/bin/statplug inspect "$$(tail -n 1 fit.log)"

bench: venv
	$(PY) benchmarks/update.py
	$(PY) benchmarks/sync.py
	$(PY) benchmarks/fit_overhead.py

clean:
	rm -rf $(VENV) demo_out

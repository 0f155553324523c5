# Every target works on a fresh machine: it creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	# tf-keras runs transformers 4.57's TF ViT (a test oracle only); it asks for the full
	# tensorflow package, so it is installed without dependencies beside tensorflow-cpu.
	$(PY) -m pip install -q --no-deps tf-keras==2.21.0
	touch $(STAMP)

test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q tests

demo: setup
	$(VENV)/bin/vitx parity --layers

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info

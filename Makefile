# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Trains the demo tokenizer on the photos bundled with scikit-image into runs/demo
# (about 9 minutes on 2 CPU cores); re-running resumes from its checkpoint.
demo: $(STAMP)
	$(BIN)/python -m vqgan_jax.main --config=configs/demo.py --workdir=runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

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

# The whole demo into runs/demo, on the photos bundled with scikit-image (about 15 minutes on
# 2 CPU cores; re-running resumes each stage from its checkpoint):
# 1. the demo tokenizer (configs/demo.py): reconstructions.png, metrics.json;
# 2. a class-conditional GPT over its codes, a class per training photo
#    (configs/demo_transformer.py, workdir runs/demo/transformer): samples.png, a row per class;
# 3. a 24x48-code sliding-window sample, one per class: large_sample.png.
demo: $(STAMP)
	$(BIN)/python -m vqgan_jax.main --config=configs/demo.py --workdir=runs/demo
	$(BIN)/python -m vqgan_jax.main --config=configs/demo_transformer.py --workdir=runs/demo/transformer
	cp runs/demo/transformer/samples.png runs/demo/samples.png
	$(BIN)/python -m vqgan_jax.sample --workdir=runs/demo/transformer --class_ids=0,1,2,3,4,5 \
	    --num=1 --height=24 --width=48 --top_k=100 --top_p=0.95 --out=runs/demo/large_sample.png

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15   # two workers: one per CPU core

clean:
	rm -rf $(VENV) runs

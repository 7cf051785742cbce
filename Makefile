# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-transformer test install clean

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

# Stage 2 over the demo tokenizer (trained first if runs/demo has not finished): a class-
# conditional GPT (a class per training photo) into runs/demo_transformer, which writes
# samples.png (a row per class); then a 24x48-code sliding-window sample, large_sample.png.
runs/demo/metrics.json: | $(STAMP)
	$(BIN)/python -m vqgan_jax.main --config=configs/demo.py --workdir=runs/demo

demo-transformer: runs/demo/metrics.json
	$(BIN)/python -m vqgan_jax.main --config=configs/demo_transformer.py --workdir=runs/demo_transformer
	$(BIN)/python -m vqgan_jax.sample --workdir=runs/demo_transformer --class_ids=0,1,2,3,4,5 \
	    --num=1 --height=24 --width=48 --top_k=100 --top_p=0.95 --out=runs/demo_transformer/large_sample.png

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15   # two workers: one per CPU core

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SHELL := /bin/bash
now = $$(date +%s)
since = $$(( $$(date +%s) - $(1) ))

# pip installs with --no-compile: byte-compiling every file of every dependency (torch, jax,
# tensorflow-datasets) took more of the install than the install itself (BENCHMARKS.md, the
# test suite); Python writes the .pyc of what is imported on its first import instead, which
# needs PYTHONDONTWRITEBYTECODE out of the commands' environment.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL = $(BIN)/pip install -q --no-compile

.PHONY: demo demo-maskgit test install clean

install: $(STAMP)

# The package alone (what the demo needs); its wall time is kept for the demo's summary.
$(STAMP): pyproject.toml
	@t0=$(now); \
	$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && \
	$(PIP_INSTALL) -e . && echo $(call since,$$t0) > $(VENV)/.install_seconds
	touch $@

# The test extra on top (pytest, xdist and the CPU build of PyTorch for the interop tests).
$(TEST_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[test]'
	touch $@

# The whole demo into runs/demo, on the photos bundled with scikit-image and scikit-learn
# (re-running resumes each stage from its checkpoint); prints each stage's wall time at its end:
# 1. the demo tokenizer (configs/demo.py): reconstructions.png, metrics.json;
# 2. a class-conditional GPT over its codes, a class per training photo
#    (configs/demo_transformer.py, workdir runs/demo/transformer): samples.png, a row per class;
# 3. a 16x32-code sliding-window sample, one per class: large_sample.png.
demo: $(STAMP)
	@set -e; t0=$(now); \
	$(BIN)/python -m vqgan_jax.main --config=configs/demo.py --workdir=runs/demo; \
	s1=$(call since,$$t0); t0=$(now); \
	$(BIN)/python -m vqgan_jax.main --config=configs/demo_transformer.py \
	    --workdir=runs/demo/transformer; \
	s2=$(call since,$$t0); t0=$(now); \
	cp runs/demo/transformer/samples.png runs/demo/samples.png; \
	$(BIN)/python -m vqgan_jax.sample --workdir=runs/demo/transformer --class_ids=0,1,2,3,4,5,6,7 \
	    --num=1 --height=16 --width=32 --top_k=100 --top_p=0.95 --out=runs/demo/large_sample.png; \
	s3=$(call since,$$t0); \
	{ echo "make demo wall times on $$(nproc) cores of $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs):"; \
	  echo "  install (when .venv was made): $$(cat $(VENV)/.install_seconds 2>/dev/null || echo '?') s"; \
	  echo "  stage 1, tokenizer:            $$s1 s"; \
	  echo "  stage 2, GPT:                  $$s2 s"; \
	  echo "  sliding-window sample:         $$s3 s"; } | tee runs/demo/demo_times.txt

# After `make demo` (it needs the demo tokenizer in runs/demo): a class-conditional MaskGIT over
# the same codes (configs/demo_maskgit.py, workdir runs/demo/maskgit, the GPT's size and
# batch, 300 steps), its samples.png copied to runs/demo/maskgit_samples.png; prints its wall time.
# A target of its own because `make demo` fills most of its 15 minutes (install 23 s, stage 1
# 355 s, stage 2 101 s, sliding window 41 s: 8 min 39 s on a 2-core AMD EPYC, 2026-12-05; about
# 14 minutes estimated on the slowest machines measured).
demo-maskgit: $(STAMP)
	@set -e; test -d runs/demo/checkpoints || { echo "run make demo first (no runs/demo)"; exit 1; }; \
	t0=$(now); \
	$(BIN)/python -m vqgan_jax.main --config=configs/demo_maskgit.py --workdir=runs/demo/maskgit; \
	s1=$(call since,$$t0); \
	cp runs/demo/maskgit/samples.png runs/demo/maskgit_samples.png; \
	{ echo "make demo-maskgit wall time on $$(nproc) cores of $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs):"; \
	  echo "  stage 2, MaskGIT:              $$s1 s"; } | tee runs/demo/demo_maskgit_times.txt

# Two pytest workers, one per CPU core; prints the suite's wall time and the 30 slowest tests.
test: $(TEST_STAMP)
	@t0=$(now); \
	$(BIN)/python -m pytest -q -n 2 --durations=30; rc=$$?; \
	echo "test suite wall time: $(call since,$$t0) s"; exit $$rc

clean:
	rm -rf $(VENV) runs

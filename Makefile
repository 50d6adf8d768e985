# Two commands a new user needs (see README.md):
#   make demo   # set up .venv, write synthetic shards, train + evaluate a paper model, print GAP@20
#   make test   # set up .venv, lint, run the test suite (all but the tests marked slow)
# make test-slow runs the slow ones (multi-process and long end-to-end runs); CI runs both.
# Setup is idempotent: the virtualenv is rebuilt only when a requirements file changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/mfb_jax_demo

.PHONY: setup demo test test-slow lint format bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@echo "[setup] creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[setup] installing the pinned packages into $(VENV) (2.6 GB; a few minutes, quiet until done)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@bash scripts/install_tcmalloc.sh || true
	@bash scripts/install_jax_gpu.sh $(PY) || true
	@touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n auto --dist worksteal -m slow

demo: setup
	@# The last shard written: a run cut short before it is written again whole.
	@test -e $(DEMO_DIR)/data/eval-00001-of-00002.tfrecord || \
	  $(PY) -m mfb_jax.synthetic --output_dir=$(DEMO_DIR)/data --num_train=2000 --num_eval=500
	$(PY) launch.py --config=configs/demo.py --workdir=$(DEMO_DIR)/work \
	  --config.data.train_pattern='$(DEMO_DIR)/data/train-*' \
	  --config.data.eval_pattern='$(DEMO_DIR)/data/eval-*'
	@echo "predict: $(PY) launch.py --config=configs/demo.py --workdir=$(DEMO_DIR)/work --mode=predict \\"
	@echo "  --config.data.eval_pattern='$(DEMO_DIR)/data/eval-*'   # writes $(DEMO_DIR)/work/predictions.csv"

bench: setup
	$(PY) launch.py --mode=bench --config=configs/paper.py:netvlad,mfb --workdir=/tmp/mfb_jax_bench

clean:
	rm -rf $(VENV) .cache

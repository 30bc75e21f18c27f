# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export PYTHON FASHION_MNIST_DIR DRY_RUN

.PHONY: prereqs install demo test docs clean

# Python with venv and the demo's data, installed with apt-get when missing (DRY_RUN=1: print only).
prereqs:
	@scripts/demo_prereqs.sh

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools warns on every editable install that a folder named like the package may shadow it:
	@# that folder is this checkout, on purpose
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

install: $(STAMP)

DEMO_RUN = runs/fashion_mnist-vicreg
# Seconds of training: the fit measures its speed in its first steps and trains as many of the config's
# 936 steps as fit (all of them where bf16 is native: ~240 s on the 2-core Xeon; ~600 of them in fp32
# on an AVX2-only CPU), so `make demo` ends in about 10 minutes on any 2-core machine.
DEMO_BUDGET_S ?= 420

demo: prereqs install
	$(PY) -m ssl_lightning fit --config experiments/fashion_mnist/vicreg.yaml --trainer.default_root_dir $(DEMO_RUN) \
	  --data.data_dir $(FASHION_MNIST_DIR) --budget.seconds $(DEMO_BUDGET_S)
	$(PY) -m ssl_lightning linear --ckpt $(DEMO_RUN)/checkpoints/last.ckpt
	@echo "raw-pixel baselines on the same files: logistic regression 84.5%, 5-NN 85.5%"

test: install
	$(PY) -m pytest -q tests

# The documentation site (docs/, mkdocs.yml) into site/; `make test` builds it with --strict too.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf runs lightning_logs wandb .pytest_cache site

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

DEMO_RUN = runs/fashion_mnist-vicreg

demo: install
	@test -d /usr/share/datasets/fashion-mnist || { echo "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' (31 MB)"; exit 1; }
	$(PY) -m ssl_lightning fit --config experiments/fashion_mnist/vicreg.yaml --trainer.default_root_dir $(DEMO_RUN)
	$(PY) -m ssl_lightning linear --ckpt $(DEMO_RUN)/checkpoints/last.ckpt
	@echo "raw-pixel baselines on the same files: logistic regression 84.5%, 5-NN 85.5%"

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf runs lightning_logs wandb .pytest_cache

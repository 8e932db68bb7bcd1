# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install system-packages serve test clean

help:  ## list the targets and what they do
	@grep -hE '^[a-zA-Z_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the pinned requirements

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -r requirements-dev.txt
	@touch $@

# Debian packages the tests start for real (Chromium for Swagger UI, nginx, wrk for the benchmark,
# curl for the README's examples).
SYSTEM_PACKAGES ?= nginx chromium wrk curl

system-packages:  ## install the Debian packages the tests need, if missing (apt-get as root or with sudo)
	@scripts/install-system-packages $(SYSTEM_PACKAGES)

# The local tracking server of make mlflow and of the demo: MLFLOW_PORT=5001 make serve when 5000 is taken.
MLFLOW_PORT ?= 5000

serve: install  ## serve the configured model with gunicorn on :8080 (none configured: the MLflow demo model)
	$(BIN)/flask --app wsgi model serve --mlflow-port $(MLFLOW_PORT)

digit.png: | $(STAMP)  ## write a held-out handwritten 7 to digit.png, to send to the service
	$(BIN)/python -c 'from service.training import write_held_out_digit; write_held_out_digit("$@", "7")'

.PHONY: mlflow download train
# The model commands talk to the local tracking server unless MLFLOW_TRACKING_URI names another.
TRAIN_ARGS ?=
download train: export MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(MLFLOW_PORT)

mlflow: install  ## the local MLflow tracking server alone (store in var/mlflow/), UI on http://127.0.0.1:5000 (MLFLOW_PORT)
	$(BIN)/flask --app wsgi model tracking-server --port $(MLFLOW_PORT)

download: install  ## fetch an MLflow run's model into models/RUN_ID/: make download RUN_ID=...
	@test -n "$(RUN_ID)" || { echo "usage: make download RUN_ID=<MLflow run id>" >&2; exit 2; }
	$(BIN)/flask --app wsgi model download '$(RUN_ID)'

train: install  ## train the digit CNN and log it to MLflow: make train TRAIN_ARGS="--epochs 8"
	$(BIN)/flask --app wsgi model train $(TRAIN_ARGS)

test: install system-packages  ## check the import layers (.importlinter), then run the whole test suite
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: soak
soak: install  ## 10 minutes of load while the alias moves every 30 s among good and bad versions (not in make test)
	$(BIN)/python -m pytest -m soak -s tests/test_soak.py $(PYTEST_ARGS)

.PHONY: bench
BENCH_ARGS ?=
bench: install  ## throughput and latency as deployed (gunicorn + wrk); writes BENCHMARKS.md
	@scripts/install-system-packages wrk
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:  ## remove caches (keeps .venv and models/)
	rm -rf .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

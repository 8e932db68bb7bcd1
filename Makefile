# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test clean

install: $(STAMP)  ## create .venv and install the pinned requirements

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -r requirements-dev.txt
	@touch $@

serve: install  ## serve the configured model with gunicorn on :8080
	$(BIN)/gunicorn -c config/gunicorn.conf.py wsgi:app

test: install  ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:  ## remove caches (keeps .venv and models/)
	rm -rf .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

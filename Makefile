# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's pip takes these two from its local disk; elsewhere pick the build for your CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-sd3 test lint install schema constraints clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,annotators]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/recipe validate recipes/demo.yaml
	$(BIN)/recipe run recipes/demo.yaml

# The same demo on the flow-matching (SD3-shaped) shapes base.
demo-sd3: install
	$(BIN)/recipe validate recipes/demo-sd3.yaml
	$(BIN)/recipe run recipes/demo-sd3.yaml

test: install
	$(BIN)/ruff check recipe_runner tests benchmarks scripts
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check recipe_runner tests benchmarks scripts
	$(BIN)/ruff format --check recipe_runner tests benchmarks scripts

schema: install
	$(BIN)/recipe schema > schemas/recipe.schema.json

# After a passing `make test` on newer packages: record their versions (torch is TORCH_SPEC's).
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  grep -viE '^(torch|torchvision|triton|nvidia-.*|cuda-.*)=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf runs .pytest_cache .ruff_cache

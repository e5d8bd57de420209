# The two commands a fresh clone needs: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv, install specdraft with what it needs, and fetch the default model once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint model clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/specdraft fetch-model

demo: model
	RAY_AUTH_MODE=disabled $(BIN)/specdraft generate --prompts examples/prompts.jsonl \
		--out out/demo.jsonl --local --workers 2 --plot out/demo.png

test: model
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --timeout=1800

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out

# Two entry points: `make demo` and `make test`. Both build what they need and are idempotent:
# a second run reuses the venv (.venv), the embedded data set (data/) and the tiny model (models/).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/emoji
TINY := models/tiny-sd
RUN ?= runs/demo
# Tests run 2 ranks on 2 cores: one BLAS thread each, or they fight over the cores. The single-process
# builds and the demo use every core.
CORES := $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test test-unit lint venv data tiny-sd clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA)/.done

$(DATA)/.done: $(STAMP) sd_train/tools/prepare.py sd_train/data/tar.py
	$(BIN)/sd-train prepare-emoji --out $(DATA)
	touch $@

tiny-sd: $(TINY)/.done

$(TINY)/.done: $(DATA)/.done sd_train/tools/tiny_sd.py sd_train/data/tar.py sd_train/data/decode.py
	OMP_NUM_THREADS=$(CORES) $(BIN)/sd-train build-tiny --data $(DATA) --out $(TINY)
	touch $@

demo: $(TINY)/.done
	OMP_NUM_THREADS=$(CORES) $(BIN)/python train.py --config configs/demo.yaml output_dir=$(RUN)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15 tests

# In-process tests only (about a minute on 2 cores): tests/unit. tests/e2e starts real processes.
test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/unit

# One formatter and one linter (ruff, settings in pyproject.toml), as CI runs them.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data models runs

# Two entry points: `make demo` and `make test`. Both build what they need and are idempotent:
# a second run reuses the venv (.venv), the embedded data set (data/) and the tiny model (models/).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo learns a small set: the 16 emoji of `--subset demo` (sd_train/tools/prepare.py DEMO_EMOJI),
# held-out loss on 64 others. The stamps depend on the Makefile too, so changing a flag here rebuilds.
DATA := data/emoji
DATA_FLAGS := --subset demo --val-count 64
TINY := models/tiny-sd
TINY_FLAGS := --resolution 32
RUN ?= runs/demo
# Post-hoc EMA targets that `make demo` reconstructs and scores after training.
POSTHOC_FLAGS := --sigma-rel 0.03,0.05,0.07,0.1,0.15 --decay 0.95,0.98,0.99
# Tests run 2 ranks on 2 cores: one BLAS thread each, or they fight over the cores. The single-process
# builds and the demo use every core.
CORES := $(shell nproc 2>/dev/null || echo 2)
# BLAS threads of the demo's builds and training. On a machine busy with other jobs use 1
# (`make demo THREADS=1`): on a 2-core box at load 3.5-7, 2 threads made a VAE step 5.7 s against
# 0.58 s with 1, and the first training steps 11 s against 0.3-0.5 s (a thread that waits for a
# descheduled peer spins).
THREADS ?= $(CORES)

.PHONY: demo test test-unit lint venv data tiny-sd clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA)/.done

$(DATA)/.done: $(STAMP) Makefile sd_train/tools/prepare.py sd_train/data/tar.py
	$(BIN)/sd-train prepare-emoji --out $(DATA) $(DATA_FLAGS)
	touch $@

tiny-sd: $(TINY)/.done

$(TINY)/.done: $(DATA)/.done Makefile sd_train/tools/tiny_sd.py sd_train/data/tar.py sd_train/data/decode.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/sd-train build-tiny --data $(DATA) --out $(TINY) $(TINY_FLAGS)
	touch $@

# Train (a second run resumes from the last checkpoint and only exports), then choose the EMA length
# after the fact: reconstruct post-hoc EMAs, score each on the held-out loss next to the raw weights
# and the run's own EMA, print the table and write RUN/posthoc_export/posthoc_loss.png.
demo: $(TINY)/.done
	@if [ -f $(RUN)/config.yaml ] && [ $(TINY)/.done -nt $(RUN)/config.yaml ]; then \
		echo "$(RUN) was trained on an older $(TINY): moved to $(RUN).stale, training afresh"; \
		rm -rf $(RUN).stale; mv $(RUN) $(RUN).stale; fi
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python train.py --config configs/demo.yaml output_dir=$(RUN)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/sd-train posthoc --run $(RUN) --eval $(POSTHOC_FLAGS)

# Two sessions side by side (tests/conftest.py says which test goes where): the multi-process tests
# one at a time (2 ranks fill 2 cores), the single-process ones beside them; the second one's log is
# printed after the first. About 13 minutes on 2 cores (d79e9da), against 16-17 in one session.
test: $(STAMP)
	@tmp=$$(mktemp -d); \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not multiproc" --basetemp=$$tmp/single tests > $$tmp/single.log 2>&1 & \
	single=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15 -m multiproc --basetemp=$$tmp/ranks tests; ranks=$$?; \
	wait $$single; rc=$$?; echo "--- single-process tests"; cat $$tmp/single.log; rm -rf $$tmp; \
	test $$ranks -eq 0 && test $$rc -eq 0

# In-process tests only (about a minute on 2 cores): tests/unit. tests/e2e starts real processes.
test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/unit

# One formatter and one linter (ruff, settings in pyproject.toml), as CI runs them.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data models runs

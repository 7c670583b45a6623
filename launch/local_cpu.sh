#!/usr/bin/env bash
# The CPU demo on 2 processes (FSDP2 over gloo), as the test suite runs it:
#   launch/local_cpu.sh                          # configs/demo.yaml, writes runs/demo
#   launch/local_cpu.sh output_dir=runs/cpu2 max_steps=50
# Extra arguments are sd-train overrides (key.sub=value); they come last, so they win.
# Needs `make tiny-sd` first (the demo data and the tiny model).
set -euo pipefail

cd "$(dirname "$0")/.."

# 2 ranks on 2 cores: one BLAS thread each, or they fight over the cores.
export OMP_NUM_THREADS=1
# The demo is offline: the tiny model is a local folder.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# The project venv when there is one (as `make venv` builds it), else whatever is on PATH.
accelerate=accelerate
if [[ -x .venv/bin/accelerate ]]; then
    accelerate=.venv/bin/accelerate
fi
command -v "$accelerate" >/dev/null 2>&1 ||
    { echo "local_cpu.sh: accelerate not found: run 'make venv' or activate the sd-train environment" >&2; exit 2; }

# The config is checked once, here, before the launcher starts any rank: a mistake is one message and
# exit 2, not the same refusal from both ranks followed by the launcher's failure report.
python=python3
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
"$python" train.py --plan --world-size 2 --config configs/demo.yaml dist.backend=gloo "$@" >/dev/null || exit 2

# dist.backend=gloo: CPU collectives, and the trainer stays on the CPU even where CUDA exists.
exec "$accelerate" launch --config_file launch/accelerate/cpu2.yaml \
    train.py --config configs/demo.yaml dist.backend=gloo "$@"

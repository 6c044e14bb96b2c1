#!/usr/bin/env bash
# Build the original study's environment (Python 3.9, torch 1.8.0 CPU, torch-optimizer 0.3.0) in tools/.venv-original
# and replay its Fashion-MNIST training loop (tools/original_study.py) for the given optimizers and seeds,
# one run at a time, writing results/original_replay/<optimizer>/seed<k>.json.
#
#   tools/original_env.sh "adahessian adam" "12345 0 1 2"
#
# Arguments: optimizers (default "adahessian adam"), seeds (default "12345 0 1 2"). Environment: PYTHON39 (a Python
# 3.9 interpreter; default: the newest 3.9 under pyenv), DATA (Fashion-MNIST IDX files), OMP_NUM_THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
OPTS=${1:-adahessian adam}
SEEDS=${2:-12345 0 1 2}
VENV=tools/.venv-original
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON39:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python 2>/dev/null | sort -V | tail -1)}
  [ -x "$PY" ] || { echo "no Python 3.9 found: set PYTHON39" >&2; exit 1; }
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==1.8.0 "numpy<1.24" pillow
  # torch-optimizer 0.3.0 only needs pytorch_ranger besides torch; --no-deps keeps pip away from torch
  "$VENV/bin/pip" install -q --no-deps torch-optimizer==0.3.0 pytorch_ranger==0.1.1
fi
"$VENV/bin/python" -c "import torch, torch_optimizer; assert torch.__version__.startswith('1.8.0'), torch.__version__"

for opt in $OPTS; do
  for seed in $SEEDS; do
    out=results/original_replay/$opt/seed$seed.json
    echo "== $opt seed $seed -> $out"
    "$VENV/bin/python" tools/original_study.py --optimizer "$opt" --seed "$seed" ${DATA:+--data "$DATA"} --out "$out"
  done
done

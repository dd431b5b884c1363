#!/usr/bin/env bash
# Make a training checkpoint the bundled model, then re-measure every committed table that depends on it.
# Run from the repository root, alone on the machine (the tables carry timings), after stopping any training:
#   training/ship.sh training/realistic-ckpt.pt > /tmp/ship.log 2>&1
# About an hour on 2 CPU cores. What it does not do, by hand afterwards: the model card's and README's figures,
# the loss curve (benchmarks/plot_training.py), and the measured values and bounds of the model's tests
# (Testing/test_network.py, Testing/test_vi.py: grep for "bundled model").
# STEPS=0 stops after the export (the weights, their manifest and the region interval only).
set -euo pipefail
CKPT=${1:?usage: training/ship.sh CHECKPOINT}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-2}
export PYTHONUNBUFFERED=1
step() { echo "== $(date -u +%H:%M:%S) $*"; "$@"; }

# export with sigma calibrated on brains 20000-20003, straight over the bundled files: the export writes both to
# temporary names and renames them only when both are complete (weights.save_weights)
step "$PY" -m PDIQSMLib.cli export "$CKPT" --out Resources/models/pdi-default.safetensors --calibrate-std --progress none
step "$PY" benchmarks/region_calibration.py --calibrate 10 --test 10 --write
[ "${STEPS:-1}" = 0 ] && exit 0
step "$PY" benchmarks/bench_realistic.py --reflections 1 2 8
step "$PY" benchmarks/bench_realistic.py --sharp --name cpu_sharp
step "$PY" benchmarks/bench_accuracy.py
step "$PY" benchmarks/bench_vi.py --defaults-only
step "$PY" benchmarks/bench_realistic.py --vi --no-ablation --seeds 31002 --name cpu
step "$PY" benchmarks/bench_realistic.py --vi --no-ablation --seeds 31000 --name cpu_31000
step "$PY" benchmarks/bench_realistic.py --vi --no-ablation --sharp --seeds 31000 31001 31002 --name cpu_sharp
step "$PY" benchmarks/sigma_ranking.py
step "$PY" benchmarks/error_spectrum.py
echo "== $(date -u +%H:%M:%S) done; now the card, README, curve and test bounds"

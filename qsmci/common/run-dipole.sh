#!/usr/bin/env bash
# Shared body of the PDIQSM QSM-CI method folders (dipole stage):
#   run-dipole.sh METHOD IN OUT
# localfield.nii.gz (ppm) + mask.nii.gz + params.json in IN -> chimap.nii.gz (ppm) in OUT, and for PDI
# methods chimap-std.nii.gz (the posterior standard deviation, ppm) beside it.
# Parameter overrides (qsm-ci run --set NAME=VALUE) arrive as $QSMCI_SET_<NAME>.
set -euo pipefail
METHOD="$1"; IN="${2:-/input}"; OUT="${3:-/output}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# the pdiqsm command: $PDIQSM, else on PATH, else the library two folders up
if [ -n "${PDIQSM:-}" ]; then CMD=($PDIQSM)
elif command -v pdiqsm >/dev/null 2>&1; then CMD=(pdiqsm)
else CMD=(python3 -m PDIQSMLib.cli); export PYTHONPATH="$HERE/../..${PYTHONPATH:+:$PYTHONPATH}"; fi
ARGS=(reconstruct "$IN/localfield.nii.gz" --mask "$IN/mask.nii.gz" --params "$IN/params.json"
      --method "$METHOD" --out-dir "$OUT/.pdiqsm" --progress none)
if [ -n "${QSMCI_SET_LAMBDA:-}" ] && [ "$QSMCI_SET_LAMBDA" != auto ]; then ARGS+=(--lambda "$QSMCI_SET_LAMBDA"); fi
if [ -n "${QSMCI_SET_SAMPLES:-}" ]; then ARGS+=(--samples "$QSMCI_SET_SAMPLES"); fi
if [ -n "${QSMCI_SET_ITERATIONS:-}" ]; then ARGS+=(--iterations "$QSMCI_SET_ITERATIONS"); fi
if [ -n "${QSMCI_SET_DEVICE:-}" ]; then ARGS+=(--device "$QSMCI_SET_DEVICE"); fi
"${CMD[@]}" "${ARGS[@]}"
STEM="$OUT/.pdiqsm/localfield_$METHOD"
mv "${STEM}_chi-mean.nii.gz" "$OUT/chimap.nii.gz"
if [ -f "${STEM}_chi-std.nii.gz" ]; then mv "${STEM}_chi-std.nii.gz" "$OUT/chimap-std.nii.gz"; fi
mv "${STEM}_run.json" "$OUT/pdiqsm-run.json"
rmdir "$OUT/.pdiqsm" 2>/dev/null || true

#!/usr/bin/env bash
# PDIQSM for QSM-CI, dipole stage: localfield.nii.gz (ppm) + mask.nii.gz + params.json -> chimap.nii.gz (ppm),
# and for PDI methods chimap-std.nii.gz (the posterior standard deviation, ppm) beside it.
# Parameter overrides (qsm-ci run --set NAME=VALUE) arrive as $QSMCI_SET_<NAME>.
set -euo pipefail
IN="${1:-/input}"; OUT="${2:-/output}"
HERE="$(cd "$(dirname "$0")" && pwd)"
METHOD=pdi-vi1
# the pdiqsm command: $PDIQSM, else on PATH, else the library beside this folder
if [ -n "${PDIQSM:-}" ]; then CMD=($PDIQSM)
elif command -v pdiqsm >/dev/null 2>&1; then CMD=(pdiqsm)
else CMD=(python3 -m PDIQSMLib.cli); export PYTHONPATH="$HERE/../..${PYTHONPATH:+:$PYTHONPATH}"; fi
ARGS=(reconstruct "$IN/localfield.nii.gz" --mask "$IN/mask.nii.gz" --params "$IN/params.json"
      --method "$METHOD" --out-dir "$OUT/.pdiqsm" --progress none)
[ -n "${QSMCI_SET_LAMBDA:-}" ] && ARGS+=(--lambda "$QSMCI_SET_LAMBDA")
[ -n "${QSMCI_SET_SAMPLES:-}" ] && ARGS+=(--samples "$QSMCI_SET_SAMPLES")
[ -n "${QSMCI_SET_ITERATIONS:-}" ] && ARGS+=(--iterations "$QSMCI_SET_ITERATIONS")
[ -n "${QSMCI_SET_DEVICE:-}" ] && ARGS+=(--device "$QSMCI_SET_DEVICE")
"${CMD[@]}" "${ARGS[@]}"
mv "$OUT/.pdiqsm/localfield_chi-mean.nii.gz" "$OUT/chimap.nii.gz"
if [ -f "$OUT/.pdiqsm/localfield_chi-std.nii.gz" ]; then mv "$OUT/.pdiqsm/localfield_chi-std.nii.gz" "$OUT/chimap-std.nii.gz"; fi
mv "$OUT/.pdiqsm/localfield_run.json" "$OUT/pdiqsm-run.json"
rmdir "$OUT/.pdiqsm" 2>/dev/null || true

#!/usr/bin/env bash
# One leased GPU session (the `device` tool, DEVELOPERS.md "Training compute"), run from the repository root:
#   1. PDI-VI speed on a whole realistic brain on the GPU (benchmarks/bench_vi_speed.py --device cuda);
#   2. training resumed from training/realistic-ckpt.pt for the rest of BUDGET seconds (--max-seconds),
#      volumes simulated by WORKERS processes, batch 16, cosine learning rate, mirrored patches; since session 15
#      half the anatomical brains with one brain's tissue boundaries (SHARP, --sharp-fraction; 0 for the old mix);
#      since session 21 a share BLEED of them (--bleed-fraction, default 0: the main line's mix; the bundled
#      weights average in 0.3 of a model trained at 0.5) with an acute bleed
#      (on the CPU, 0.5 helped bleeds by 5 points and cost brains without one half a point: bleed_recovery_bleedmix.md);
#      since session 39 DISTANT="LO HI" (--distant-ppm, default none) adds distant sources' harmonic field to the mix,
#      and COLUMNS (--column-fraction, default 0) cuts that share of the anatomical brains to an in-plane column;
#      since session 40 TEXTURE (--texture-fraction, default 0) gives that share fine tissue texture;
#   3. the checkpoint, its log and the tables copied to $OUT (the checkpoint without its history, which the
#      log holds, to stay under the tool's 16 MiB per file; training/merge_device_run.py puts them back).
# Carried wheels (.whl: nibabel, nilearn for the MNI152 templates) are installed first when present.
# Locally, for a check of the script itself: DEVICE=cpu BUDGET=120 WORKERS=1 OUT=/tmp/o training/device_run.sh
# As run on the lease (session 8): wheels first, here (ignored folder .whl):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl nibabel==5.4.2 nilearn==0.13.1
# then the device tool's run with command "BUDGET=500 training/device_run.sh", carry [".whl"], timeout_s 590
# (a 15-minute lease: ~1 min to start, one such call, then training/merge_device_run.py /work/.device/N here).
# Since session 18 one call can hold both: "BUDGET=590 BENCH=0 LR=2e-4 SECOND_SECONDS=150 SECOND_LR=4e-5".
# Session 9 used the whole lease in two calls: "BUDGET=600 BENCH=0 LR=2e-4" (timeout 600; 561 s), then at once,
# on the still-warm machine, "KEEP=1 BUDGET=250 BENCH=0 LR=4e-5" (timeout 285; 211 s); merge each in order.
set -u -o pipefail
OUT=${OUT:?set OUT to the folder for the results}
BUDGET=${BUDGET:-500}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-13}
BATCH=${BATCH:-16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt" || exit 1
import os, torch, numpy, scipy, nibabel
from PDIQSMLib import anatomy
print("torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__, "cpus", os.cpu_count())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "| MNI152 files:", anatomy.available())
assert anatomy.available(), "nilearn's MNI152 files are missing: carry .whl"
PYEOF

if [ "$DEVICE" = cuda ] && [ "${BENCH:-1}" = 1 ]; then
  timeout 120 $PY benchmarks/bench_vi_speed.py --device cuda --iterations 4 > "$OUT/vi_speed.log" 2>&1
  cp benchmarks/results/vi_speed_cuda.md "$OUT/" 2>/dev/null
fi

# KEEP=1 on a machine still warm from the previous call: go on from that call's checkpoint
if [ "${KEEP:-0}" = 1 ] && [ -f /tmp/device-ckpt.pt ]; then echo "going on from /tmp/device-ckpt.pt" | tee -a "$OUT/env.txt"
else cp training/realistic-ckpt.pt /tmp/device-ckpt.pt; fi
# SECOND_SECONDS > 0: a second, low-lr cycle (SECOND_LR, default 4e-5) in the same call, resumed from the first's
# checkpoint, for that many seconds of the budget (session 18 lost its planned second call: the machine went back idle
# between calls; one call with both cycles cannot lose it)
SECOND=${SECOND_SECONDS:-0}
train() {  # $1 lr, $2 seconds; appends to the one log
  echo "training for $2 s at lr $1" | tee -a "$OUT/env.txt"
  timeout $(($2 + 120)) $PY -m PDIQSMLib.cli train --steps 1000000 --out /tmp/device-ckpt.pt --log "$OUT/device-log.jsonl" \
    --batch-size "$BATCH" --lr "$1" --lr-final 1e-5 --beta 1 --ema 0.998 --workers "$WORKERS" --threads 2 \
    --pool-size 48 --validate-every 2000 --validation-count 3 --flips --sharp-fraction "${SHARP:-0.5}" \
    --bleed-fraction "${BLEED:-0}" --distant-ppm ${DISTANT:-0 0} --column-fraction "${COLUMNS:-0}" \
    --texture-fraction "${TEXTURE:-0}" \
    --max-seconds "$2" --device "$DEVICE" \
    --progress none >> "$OUT/train.log" 2>&1
  echo "train exit $?" | tee -a "$OUT/env.txt"
}
left=$((BUDGET - SECONDS - 60 - (SECOND > 0 ? SECOND + 60 : 0)))  # each run makes its validation set before, validates after
train "${LR:-3e-4}" "$left"
if [ "$SECOND" -gt 0 ]; then train "${SECOND_LR:-4e-5}" "$SECOND"; fi
$PY - "$OUT" <<'PYEOF'
import sys, torch
state = torch.load("/tmp/device-ckpt.pt", map_location="cpu", weights_only=True)
print("steps", state["step"], "history kept in the log:", len(state["history"]))
state["history"] = []
torch.save(state, f"{sys.argv[1]}/device-ckpt.pt")
PYEOF
ls -la "$OUT"

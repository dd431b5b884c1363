"""Put a leased machine's training run (training/device_run.sh) back into the local checkpoint and log.

The device returns the checkpoint without its history (to stay under 16 MiB) and the run's own log; this
writes the checkpoint with the local history plus the run's records (their validations only,
``training.kept_history``: the log holds every step), and appends those records to the
local log. Records that the local log already holds (same step or earlier) are refused.

    python training/merge_device_run.py DEVICE_DIR [--ckpt training/realistic-ckpt.pt] [--log training/realistic-log.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from PDIQSMLib.training import kept_history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device_dir", type=Path)
    ap.add_argument("--ckpt", type=Path, default=Path("training/realistic-ckpt.pt"))
    ap.add_argument("--log", type=Path, default=Path("training/realistic-log.jsonl"))
    args = ap.parse_args()
    local = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    remote = torch.load(args.device_dir / "device-ckpt.pt", map_location="cpu", weights_only=True)
    records = [json.loads(line) for line in (args.device_dir / "device-log.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= remote["step"]]
    if not records or records[0]["step"] != local["step"] + 1 or records[-1]["step"] != remote["step"]:
        raise SystemExit(f"{args.device_dir}: its steps {records[0]['step'] if records else None}..{remote['step']} "
                         f"do not continue {args.ckpt} (step {local['step']})")
    for r in records:
        r["device"] = "cuda"
    remote["history"] = kept_history(list(local["history"]) + records)
    tmp = args.ckpt.with_name(args.ckpt.name + ".tmp")
    torch.save(remote, tmp)
    tmp.replace(args.ckpt)
    with open(args.log, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"{args.ckpt}: step {local['step']} -> {remote['step']} ({len(records)} records)")


if __name__ == "__main__":
    main()

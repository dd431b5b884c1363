"""Put a local background training run (on this machine's CPU) back into training/'s checkpoint and log.

A background run trains from a copy of the checkpoint into scratch files, so that training/ always holds a
consistent pair; it saves every 50 steps and on SIGTERM, and a resumed run repeats the steps after its last
save in its log. This takes the run's records after the last step that training/'s log holds up to the
scratch checkpoint's step (a repeated step: the later record wins), refuses them unless they continue the log
without a gap, marks them ``"device": "cpu"`` plus any EXTRA fields (JSON, e.g. the training mix), appends them
and replaces the checkpoint, its history cut to the validation records (``training.kept_history``: the log
holds the rest).

    python training/merge_cpu_run.py SCRATCH_CKPT SCRATCH_LOG [--extra '{"sharp_fraction": 0.5}']
        [--ckpt training/realistic-ckpt.pt] [--log training/realistic-log.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from PDIQSMLib.training import kept_history


def new_records(scratch_log: Path, after: int, upto: int) -> list[dict]:
    """The records of steps after..upto, the last one written for each step, in order, or SystemExit."""
    by_step = {}
    for line in scratch_log.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if after < record["step"] <= upto:
                by_step[record["step"]] = record
    steps = sorted(by_step)
    if not steps or steps != list(range(after + 1, upto + 1)):
        found = f"{steps[0]}..{steps[-1]} ({len(steps)} steps)" if steps else "none"
        raise SystemExit(f"{scratch_log}: steps {after + 1}..{upto} needed, found {found}")
    return [by_step[s] for s in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scratch_ckpt", type=Path)
    ap.add_argument("scratch_log", type=Path)
    ap.add_argument("--extra", default="{}", help="JSON fields added to every record")
    ap.add_argument("--ckpt", type=Path, default=Path("training/realistic-ckpt.pt"))
    ap.add_argument("--log", type=Path, default=Path("training/realistic-log.jsonl"))
    args = ap.parse_args()
    extra = json.loads(args.extra)
    lines = [line for line in args.log.read_text().splitlines() if line.strip()]
    last = json.loads(lines[-1])["step"] if lines else 0
    state = torch.load(args.scratch_ckpt, map_location="cpu", weights_only=True)
    upto = int(state["step"])
    records = new_records(args.scratch_log, last, upto)
    state["history"] = kept_history(state.get("history", []))
    tmp = args.ckpt.with_name(args.ckpt.name + ".tmp")
    torch.save(state, tmp)
    with open(args.log, "a") as f:
        for r in records:
            f.write(json.dumps({**r, "device": "cpu", **extra}) + "\n")
    tmp.replace(args.ckpt)
    print(f"{args.ckpt}: step {last} -> {upto} ({len(records)} records)")


if __name__ == "__main__":
    main()

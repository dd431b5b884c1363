"""Average the weights of two checkpoints of one training line, to trade between what each learnt.

A model fine-tuned from another (both from the same training line) and its starting point lie in one basin of
the loss, and the weights between them often score better than the straight line between their scores (the
"model soup" of Wortsman et al., ICML 2022). Here: ``(1 - alpha) * BASE + alpha * OTHER``, for the raw weights and
for their moving average alike; the optimizer state, step, random state and training mix come from OTHER, and
the config records the average, so the exported manifest says what the bundled weights are. The average is
scored on the validation brains (as a training run scores its checkpoints) and that record, at OTHER's step and
marked ``weight_average``, ends the checkpoint's history and, with --log, the log (a repeated step: the plot
and the export read the last record of a step).

    python training/average_checkpoints.py BASE OTHER --alpha 0.3 --out training/realistic-ckpt.pt \
        [--log training/realistic-log.jsonl] [--validation-count 3]

OUT may be BASE or OTHER: both are read before it is written (to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from PDIQSMLib.training import kept_history, save_atomic, weight_average_of


def mixed(base: dict, other: dict, alpha: float) -> dict:
    """``(1 - alpha) * base + alpha * other`` for each floating-point tensor; the others (counters) from ``other``."""
    if base.keys() != other.keys():
        raise SystemExit(f"the checkpoints' weights differ in name: {sorted(base.keys() ^ other.keys())[:5]}")
    out = {}
    for name, b in base.items():
        o = other[name]
        if b.shape != o.shape:
            raise SystemExit(f"{name}: shape {tuple(b.shape)} against {tuple(o.shape)}")
        out[name] = torch.lerp(b, o.to(b.dtype), alpha) if b.is_floating_point() else o.clone()
    return out


def averaged(base: dict, other: dict, alpha: float, base_name: str, other_name: str) -> dict:
    """The checkpoint ``other`` with its weights (and their moving average when both keep one) averaged with
    ``base``'s; its config gains ``weight_average`` (the two checkpoints, their steps, alpha, and the recipe of
    either that was itself an average as ``base_average`` / ``other_average``)."""
    if not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"--alpha: a share between 0 and 1, not {alpha:g}")
    if base["preset"] != other["preset"]:
        raise SystemExit(f"presets differ: {base['preset']} against {other['preset']}")
    state = dict(other)
    state["model"] = mixed(base["model"], other["model"], alpha)
    if base.get("ema") and other.get("ema"):
        state["ema"] = mixed(base["ema"], other["ema"], alpha)
    elif base.get("ema") or other.get("ema"):
        raise SystemExit("one checkpoint keeps a moving average of its weights and the other does not")
    config = json.loads(other["config"])
    config.pop("started_from", None)  # OTHER's own origin: kept below as other_average
    config["weight_average"] = {"base": base_name, "base_step": int(base["step"]), "other": other_name,
                                "other_step": int(other["step"]), "alpha": alpha}
    for name, state_of in (("base", base), ("other", other)):  # an input that is, or began as, an average
        inner = weight_average_of(json.loads(state_of["config"]))
        if inner:
            config["weight_average"][f"{name}_average"] = inner
    state["config"] = json.dumps(config)
    state["history"] = kept_history(other.get("history", []))
    return state


def score(state: dict, count: int) -> dict:
    """The validation record of a checkpoint's weights (moving average when kept), as training writes it."""
    from PDIQSMLib.simulation import REALISTIC
    from PDIQSMLib.training import checkpoint_net, validate, validation_sets

    net = checkpoint_net(state).eval()
    sharp_fraction = json.loads(state["config"]).get("simulation", {}).get("sharp_fraction", 0.0)
    plain, sharp = validation_sets(count, replace(REALISTIC, sharp_fraction=sharp_fraction))
    record = {"validation": validate(net, plain)}
    if sharp:
        record["validation_sharp"] = validate(net, sharp)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--alpha", type=float, required=True, help="OTHER's share of the weights")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log", type=Path, help="append the average's record to this training log")
    ap.add_argument("--validation-count", type=int, default=3, help="validation brains (0: none scored)")
    args = ap.parse_args()
    base = torch.load(args.base, map_location="cpu", weights_only=True)
    other = torch.load(args.other, map_location="cpu", weights_only=True)
    state = averaged(base, other, args.alpha, args.base.name, args.other.name)
    last_loss = next((r.get("loss") for r in reversed(other.get("history", [])) if r["step"] == other["step"]), None)
    record = {"step": int(state["step"]), "loss": last_loss,  # OTHER's last step's: the average is no training step
              "weight_average": json.loads(state["config"])["weight_average"]}
    if args.validation_count > 0:
        record.update(score(state, args.validation_count))
    state["history"] = state["history"] + [record]
    save_atomic(state, args.out)
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()

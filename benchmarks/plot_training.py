"""Loss curve of a training log (JSON lines): running mean of the training loss and the validations.

    python benchmarks/plot_training.py training/default-log.jsonl Resources/models/pdi-default-loss.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(log_path: str, out_path: str) -> None:
    by_step = {}
    for line in open(log_path):
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record  # a resumed run repeats the steps after its checkpoint: last wins
    records = [by_step[k] for k in sorted(by_step)]
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    window = max(1, min(100, len(loss) // 10))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    val = [(r["step"], r["validation"]) for r in records if "validation" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, loss, color="0.8", lw=0.5, label="loss per step")
    a.plot(steps[window - 1:], smooth, color="C0", label=f"running mean ({window})")
    a.set_xlabel("step")
    a.set_ylabel("Gaussian NLL (Eq. 9, scaled units)")
    a.legend()
    if val:
        b.plot([s for s, _ in val], [v["rmse"] for _, v in val], "o-", label="validation RMSE (%)")
        b2 = b.twinx()
        b2.plot([s for s, _ in val], [100 * v["coverage2"] for _, v in val], "s--", color="C1", label="2-sigma coverage (%)")
        b2.set_ylabel("2-sigma coverage (%)")
        b.set_xlabel("step")
        b.set_ylabel("RMSE (%)")
        b.legend(loc="upper left")
        b2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    print(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Loss curve of a training log (JSON lines): running mean of the training loss and the validations.

    python benchmarks/plot_training.py training/default-log.jsonl Resources/models/pdi-default-loss.png \
        45.4 "Tikhonov, brains 1-4" 51.6 "TKD, brains 1-4"
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gpu_spans(records: list[dict]) -> list[tuple[int, int]]:
    """(first step, last step) of each unbroken run of records trained on a GPU (``device`` cuda), in log order."""
    spans: list[list[int]] = []
    previous_on_gpu = False
    for r in records:
        on_gpu = str(r.get("device", "cpu")).startswith("cuda")
        if on_gpu and previous_on_gpu:
            spans[-1][1] = r["step"]
        elif on_gpu:
            spans.append([r["step"], r["step"]])
        previous_on_gpu = on_gpu
    return [(first, last) for first, last in spans]


def comparable_validations(records: list[dict]) -> list[tuple[int, dict]]:
    """(step, validation) of the records scored on the log's usual brains. A record that says how many brains it was
    scored on (``validation_count``) and differs from the most common count is left out: a run launched with another
    --validation-count adds brains, and its means are not on the line's scale (its re-scored records are)."""
    val = [(r["step"], r["validation"], r.get("validation_count")) for r in records if "validation" in r]
    counts = [len(v.get("rmse_each", [])) for _, v, _ in val]
    usual = max(set(counts), key=counts.count) if counts else 0
    return [(s, v) for s, v, n in val if n is None or n == usual]


def main(log_path: str, out_path: str, references: list[tuple[float, str]] = ()) -> None:
    by_step = {}
    for line in open(log_path):
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record  # a resumed run repeats the steps after its checkpoint: last wins
    records = [by_step[k] for k in sorted(by_step)]
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    beta = np.array([r.get("beta", 0.0) for r in records])
    window = max(1, min(100, len(loss) // 10))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, loss, color="0.8", lw=0.5, label="loss per step")
    for i, value in enumerate(sorted(set(beta))):  # beta-NLL values are on another scale: one curve per beta
        sel = beta == value
        if sel.sum() > window:
            smooth = np.convolve(loss[sel], np.ones(window) / window, mode="valid")
            name = "Eq. 9" if value == 0 else f"beta-NLL, beta {value:g}"
            a.plot(steps[sel][window - 1:], smooth, ".", ms=1, color=f"C{i}", label=f"{name}, mean of {window}")
    lo, hi = np.percentile(loss, [1, 99])
    a.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))  # rare spikes (a blown-up NLL step) off the chart
    a.set_xlabel("step")
    a.set_ylabel("training loss (scaled units)")
    a.legend(markerscale=8)
    val = comparable_validations(records)
    if val:
        counts = {len(v.get("rmse_each", [])) for _, v in val}
        if len(counts) == 1 and min(counts) > 0:  # the same brains in every check: their mean
            n = counts.pop()
            b.plot([s for s, _ in val], [v["rmse"] for _, v in val], "o-", ms=3, label=f"validation RMSE %, brains 1-{n}")
            if all("rmse_demeaned" in v for _, v in val):
                b.plot([s for s, _ in val], [v["rmse_demeaned"] for _, v in val], "^-", ms=3, color="C2",
                       label=f"demeaned, brains 1-{n}")
        else:
            # the first two validation brains are in every check (later checks add two more)
            first_two = [np.mean(v["rmse_each"][:2]) if "rmse_each" in v else v["rmse"] for _, v in val]
            b.plot([s for s, _ in val], first_two, "o-", ms=3, label="validation RMSE %, brains 1-2")
            four = [(s, v["rmse"]) for s, v in val if len(v.get("rmse_each", [])) >= 4]
            if four:
                b.plot(*zip(*four), "^-", ms=3, color="C2", label="validation RMSE %, brains 1-4")
        kept = {s for s, _ in val}
        sharp = [(r["step"], r["validation_sharp"]["rmse_demeaned"]) for r in records
                 if "validation_sharp" in r and r["step"] in kept]
        if sharp:  # runs whose mix sharpens some brains also score the validation brains sharpened
            b.plot(*zip(*sharp), "v", ms=4, color="C3", label="demeaned, the same brains sharpened")
        for value, label in references:
            b.axhline(value, color="0.4", ls=":", lw=1)
            b.text(b.get_xlim()[0], value, " " + label, va="bottom", fontsize=7, color="0.3")
        b2 = b.twinx()
        b2.plot([s for s, _ in val], [100 * v["coverage2"] for _, v in val], "s--", ms=3, color="C1",
                label="2-sigma coverage (%)")
        b2.set_ylabel("2-sigma coverage (%)")
        b.set_xlabel("step")
        b.set_ylabel("RMSE (%)")
        b.legend(loc="upper left", fontsize=8)
        b2.legend(loc="upper right", fontsize=8)
    spans = gpu_spans(records)
    for i, (first, last) in enumerate(spans):  # steps trained on a leased GPU (a step there is several CPU steps' data)
        for axis in (a, b):
            axis.axvspan(first, last, color="C4", alpha=0.08, label="on a GPU" if axis is a and i == 0 else None)
    if spans:
        a.legend(markerscale=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    print(out_path)


if __name__ == "__main__":
    # optional pairs after the two paths: VALUE LABEL, drawn as reference lines on the validation panel
    extra = sys.argv[3:]
    main(sys.argv[1], sys.argv[2], [(float(v), t) for v, t in zip(extra[::2], extra[1::2])])

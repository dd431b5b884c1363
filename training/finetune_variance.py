"""Train the log-variance decoder alone, on large crops of simulated volumes, the rest of the network frozen.

Why: PDI's sigma ranks its own errors poorly on realistic brains (Spearman 0.12 on the ten held-out ones;
issue 12 asks 0.35), and it is nearly flat (p10-p90 within a factor 1.5) while the local error scale spans
a factor 3 (benchmarks/results/sigma_ranking.md). The network was trained on 64x64x32 patches, where a large
part of the error comes from the field cut off at the patch's faces; at inference it sees whole brains. This
script fits the variance decoder by the same Gaussian NLL (Eq. 9, beta 0) on crops several times larger, with
the encoder and the mean decoder frozen: the mean map, and so every accuracy figure, stays bit for bit the
same, only sigma changes. The frozen parts run without gradients (bf16 autocast where the CPU has it).

The output is a checkpoint in the training format (weights, step, history; ``pdiqsm export`` reads it), with
this run's own state under ``variance_run`` so that it resumes. Validation: Spearman(sigma, |error|), 2-sigma
coverage and the NLL on the validation brains (10000+, one pass), never on the benchmark brains.

    .venv/bin/python training/finetune_variance.py training/realistic-ckpt.pt /tmp/var-ckpt.pt --seconds 3600

Measured (session 20, benchmarks/results/variance_finetune.md): a negative result. 1500 steps on 128x128x80 crops
moved the validation Spearman 0.128 -> 0.136 within swings as large as that, with no better NLL: not shipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PDIQSMLib.inference import predict  # noqa: E402
from PDIQSMLib.metrics import calibration  # noqa: E402
from PDIQSMLib.network import CHI_SCALE, PRESETS, PDINet, fast_layout, gaussian_nll, use_bf16  # noqa: E402
from PDIQSMLib.network_io import clamp_logvar, to_input  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, make_volume, random_patch  # noqa: E402
from PDIQSMLib.training import save_atomic, validation_set, with_prior  # noqa: E402

SEED = 70_000  # this run's volumes: apart from training (0), validation (10000+), calibration (20000+), benchmarks


def crop_loss(net: PDINet, crop: tuple[np.ndarray, ...], bf16: bool) -> torch.Tensor:
    """Eq. 9 on one crop (field, chi, mask, prior), gradients through the log-variance decoder only."""
    field, chi, mask, prior = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None] for a in crop)
    x = to_input(field, prior)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            bottom, skips = net.encode(x)
            raw_mean = net.mean_decoder(bottom, skips)
        logvar = net.logvar_decoder(bottom, skips)
    mean, logvar = net.finish(raw_mean.float(), logvar.float(), x)
    return gaussian_nll(mean, clamp_logvar(logvar), chi * CHI_SCALE, mask)


@torch.no_grad()
def score(net: PDINet, samples) -> dict:
    """Spearman(sigma, |error|), 2-sigma coverage and the per-voxel Gaussian NLL (ppm units) on whole brains."""
    rho, cover, nll = [], [], []
    for s in samples:
        mean, std = predict(net, s.field, s.mask, geometry=s.geometry)
        c = calibration(mean, std, s.chi, s.mask)
        rho.append(c["spearman_sigma_error"])
        cover.append(c["within_2sigma"])
        m = s.mask > 0
        err, sd = np.abs(mean[m] - s.chi[m]).astype(np.float64), std[m].astype(np.float64)  # sd >= MIN_STD_PPM
        nll.append(float(np.mean(0.5 * (err / sd) ** 2 + np.log(sd))))
    return {"spearman": round(float(np.mean(rho)), 4), "spearman_each": [round(float(r), 4) for r in rho],
            "coverage2": round(float(np.mean(cover)), 4), "nll": round(float(np.mean(nll)), 4)}


def report(log_path: Path, note: str) -> None:
    """The validation curve of a run's log as benchmarks/results/variance_finetune.md (with the machine)."""
    from benchmarks.common import write_table

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    lines = ["| variance-only step | Spearman(sigma, abs error) | each brain | 2-sigma coverage | NLL (ppm units) |",
             "|---|---|---|---|---|"]
    for r in records:
        if "validation" in r:
            v = r["validation"]
            each = ", ".join(f"{x:.3f}" for x in v["spearman_each"])
            lines.append(f"| {r['variance_step']} | {v['spearman']:.3f} | {each} | {v['coverage2']:.3f} | {v['nll']:.4f} |")
    write_table("variance_finetune", "PDI's log-variance decoder trained alone on large crops (training/finetune_variance.py)",
                "\n".join(lines) + "\n\n" + note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="the trained network (training checkpoint), read only")
    ap.add_argument("out", type=Path, help="checkpoint written (and resumed from when it exists)")
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--crop", type=int, nargs=3, default=(128, 128, 80))
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--refresh-every", type=int, default=3)
    ap.add_argument("--validate-every", type=int, default=100)
    ap.add_argument("--validation", type=int, default=2, help="validation brains (10000+)")
    ap.add_argument("--log", type=Path, default=None, help="JSON lines (default: OUT with .jsonl)")
    ap.add_argument("--report", default=None, metavar="NOTE", help="write the log's validation curve as a table "
                    "(benchmarks/results/variance_finetune.md) with this note under it, and train nothing")
    args = ap.parse_args()
    if args.report is not None:
        report(args.log or args.out.with_suffix(".jsonl"), args.report)
        return
    if args.out.resolve() == args.checkpoint.resolve():
        sys.exit(f"{args.out}: would overwrite the input checkpoint; name another output")
    log_path = args.log or args.out.with_suffix(".jsonl")
    source = args.out if args.out.exists() else args.checkpoint
    state = torch.load(source, map_location="cpu", weights_only=True)
    net = PDINet(PRESETS[state["preset"]])
    net.load_state_dict(state["model"])
    net.requires_grad_(False)
    net.logvar_decoder.requires_grad_(True)
    net = fast_layout(net, "cpu")
    bf16 = use_bf16("auto", "cpu")
    opt = torch.optim.Adam(net.logvar_decoder.parameters(), lr=args.lr)
    run = json.loads(state["variance_run"]) if "variance_run" in state else None
    rng = np.random.default_rng(SEED)
    step = 0
    if run is not None:
        opt.load_state_dict(state["variance_optimizer"])
        for group in opt.param_groups:
            group["lr"] = args.lr
        rng.bit_generator.state = run["rng"]
        step = int(run["step"])
    validation = validation_set(count=args.validation)
    prior = net.config.prior
    pool = [with_prior(make_volume(rng, REALISTIC), prior) for _ in range(args.pool)]

    def save() -> None:
        out = copy.copy(state)
        out["model"] = {k: v.contiguous() for k, v in net.state_dict().items()}
        out["variance_optimizer"] = opt.state_dict()
        out["variance_run"] = json.dumps({"step": step, "rng": rng.bit_generator.state, "lr": args.lr,
                                          "crop": list(args.crop), "source": str(args.checkpoint)})
        save_atomic(out, args.out)

    with log_path.open("a") as log:
        def write(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)

        if run is None:
            net.eval()
            write({"variance_step": 0, "validation": score(net, validation)})
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            net.train()
            sample = pool[int(rng.integers(len(pool)))]
            loss = crop_loss(net, random_patch(sample, tuple(args.crop), rng, min_fill=0.4), bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            record = {"variance_step": step, "loss": round(loss.item(), 5),
                      "seconds": round(time.perf_counter() - start, 1)}
            if step % args.refresh_every == 0:
                pool[int(rng.integers(len(pool)))] = with_prior(make_volume(rng, REALISTIC), prior)
            if step % args.validate_every == 0:
                net.eval()
                record["validation"] = score(net, validation)
                save()
            write(record)
        save()


if __name__ == "__main__":
    main()

"""Time of one training step of the default preset (batch 2, 64x64x32 patches, Adam) on this machine:
fp32, fp32 with channels-last memory layout, and bf16 autocast with channels-last. Whether bf16 pays
depends on the CPU (AVX512-BF16 or AMX); training's precision 'auto' uses it only where it does.
Writes benchmarks/results/train_step_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib.network import PRESETS, PDINet, gaussian_nll  # noqa: E402
from PDIQSMLib.training import use_bf16  # noqa: E402


def step_times(mode: str, device: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    net = PDINet(PRESETS["default"]).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(2, 2, 64, 64, 32, device=device)
    y, m = torch.randn(2, 1, 64, 64, 32, device=device), torch.ones(2, 1, 64, 64, 32, device=device)
    if mode != "fp32":
        net, x = net.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    for _ in range(steps + 1):  # the first step (allocation, kernel choice) is not counted
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mode == "bf16 + channels-last"):
            mean, logvar = net(x)
        loss = gaussian_nll(mean.float(), logvar.float(), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16-steps", type=int, default=2, help="bf16 can be ~100x slower on CPUs without it")
    args = parser.parse_args()
    rows = ["| mode | median s/step | steps timed |", "|---|---|---|"]
    for mode in ("fp32", "fp32 + channels-last", "bf16 + channels-last"):
        n = args.bf16_steps if mode.startswith("bf16") else args.steps
        t = step_times(mode, args.device, n)
        rows.append(f"| {mode} | {statistics.median(t):.3f} | {n} |")
        print(rows[-1], flush=True)
    rows.append(f"\nprecision 'auto' on this machine: {'bf16' if use_bf16('auto', args.device) else 'fp32'}")
    write_table(f"train_step_{args.device}", "One training step, default preset, batch 2, 64x64x32", "\n".join(rows))


if __name__ == "__main__":
    main()

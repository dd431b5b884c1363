"""Would PDI-VI1 be as accurate with part of the mean decoder's full-resolution level frozen (and so cheaper)?

PDI-VI1 tunes the decoders on cached encoder features; the full-resolution level costs most of an iteration (its
three 3x3x3 convolutions' backward passes ~0.7 s of 2.4 on 2 AMD EPYC cores, bf16, 160^3). Frozen, the convolution
over the cached skip could be computed once and the others would need no weight gradients (about -23 % a step).
This measures the accuracy side only, by freezing through the optimiser (no speed-up is built):

- ``default``: PDI-VI1 with every default;
- ``skip``: the top level's first convolution's half that reads the skip held at its value (zero gradient);
- ``top``: the top level's two convolutions frozen (upsampler and head tuned).

Brains: the sigma-calibration brains of ``vi_trace.py`` (20000-20003) and the ICH case (seed 0). Prints one line per
run (demeaned NRMSE %); runs of one thread side by side: no timings worth quoting.

    python benchmarks/vi_freeze.py MODE SEED [SEED ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vi_trace import brain  # noqa: E402
from PDIQSMLib import vi  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402

MODES = ("default", "skip", "top")


def frozen_model(mode: str):
    """``vi.Model.__init__`` that freezes the part named by ``mode`` of the mean decoder's top level."""
    init = vi.Model.__init__

    def patched(self, net, variant, volumes, variance="network", bf16=False):
        init(self, net, variant, volumes, variance, bf16)
        top = net.mean_decoder.convs[-1]
        if mode == "skip":  # Adam's moments stay 0 for a zero gradient: those weights do not move
            c = top[0].weight.shape[1] // 2
            top[0].weight.register_hook(lambda g: torch.cat([g[:, :c], torch.zeros_like(g[:, c:])], 1))
        elif mode == "top":
            frozen = {id(p) for p in top.parameters()}
            for p in top.parameters():
                p.requires_grad_(False)
            self.params[:] = [p for p in self.params if id(p) not in frozen]

    return patched


def main() -> None:
    mode, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {', '.join(MODES)}")
    if mode != "default":
        vi.Model.__init__ = frozen_model(mode)
    for seed in seeds:
        s, noise_std = brain(seed)
        r = reconstruct(s.field, s.mask, s.geometry, Settings(method="pdi-vi1", device="cpu"), noise_std=noise_std)
        print(mode, seed, f"nrmse {nrmse_demeaned(r.mean, s.chi, s.mask > 0):.2f}", "iterations",
              r.info.get("iterations"), flush=True)


if __name__ == "__main__":
    main()

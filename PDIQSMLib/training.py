"""Supervised Bayesian training of PDI (Eq. 9): simulated patches, masked Gaussian NLL, Adam.

Resumable: the checkpoint holds weights, optimiser state, step, the data generator's state and the
loss log, and is written atomically every ``checkpoint_every`` steps and at the end. Realistic
volumes take seconds to simulate; with ``workers`` > 0 they are made in background processes and
replace pooled volumes as they arrive (the order then depends on timing; ``workers`` = 0 is exactly
reproducible). Channels-last memory layout is used on the CPU (measured 1.3x faster); bf16 autocast
only where the hardware has bf16 arithmetic (``precision`` 'auto'; on a CPU without AVX512-BF16 or
AMX it was 90x slower, benchmarks/results/train_step_cpu.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputError
from .memory import reuse_freed_memory
from .network import CHI_SCALE, FIELD_SCALE, PRESETS, PDINet, fast_layout, gaussian_nll, use_bf16
from .network_io import clamp_logvar, network_inputs, to_input
from .schedules import cosine
from .simulation import REALISTIC, Sample, SimulationConfig, make_volume, random_patch
from .weighting import data_weight, without_mean


@dataclass
class TrainConfig:
    preset: str = "default"
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-3
    patch: tuple[int, int, int] = (64, 64, 32)
    seed: int = 0
    pool_size: int = 8
    refresh_every: int = 3  # steps between replacing one pooled volume with a fresh one
    validate_every: int = 250
    checkpoint_every: int = 50
    threads: int = 0  # 0: torch's default
    beta: float = 0.0  # 0: Eq. 9; > 0: beta-NLL (see network.gaussian_nll)
    ema: float = 0.0  # > 0: also keep an exponential moving average of the weights (validated and exported)
    workers: int = 0  # background processes simulating volumes (0: in the training loop, reproducible)
    precision: str = "auto"  # 'auto' (bf16 where the hardware has it), 'bf16', 'fp32'
    max_seconds: float = 0.0  # > 0: also stop (validate, save) after this much wall-clock time in this run
    lr_final: float = 0.0  # > 0: cosine decay from lr to this over the run (its time when max_seconds, else its steps)
    flips: bool = False  # flip each patch along random axes (the physics is symmetric under it, see flip_patch)
    simulation: SimulationConfig = field(default_factory=lambda: REALISTIC)


def with_prior(sample: Sample, kind: str) -> Sample:
    """``sample`` with its field's mean in the mask taken off and its prior channel computed (unchanged when it has
    one; no channel when ``kind`` is 'none'): both channels as the pipeline builds them (``weighting.without_mean``,
    ``network_io.network_inputs``), so that training sees what the network is fed. With a noise map (a bleed,
    simulation.add_bleed) that is the W-weighted prior and the field the reliable data predict where the map says the
    field is noise; without one, the field (already zero outside the mask) less its mean."""
    if sample.prior is None:  # the mean weighted as the pipeline weighs it; taking it off twice changes nothing
        sample.field = without_mean(sample.field, sample.mask, sample.noise_map)[0]
    if kind != "none" and sample.prior is None:
        weight = None if sample.noise_map is None else data_weight(sample.mask, sample.noise_map)
        sample.field, sample.prior = network_inputs(kind, sample.field, sample.mask, sample.geometry, weight)
    return sample


def scheduled_lr(lr: float, lr_final: float, progress: float) -> float:
    """Cosine decay from ``lr`` (``progress`` 0) to ``lr_final`` (``progress`` >= 1); ``lr`` when ``lr_final`` is 0."""
    if lr_final <= 0:
        return lr
    return cosine(lr, lr_final, progress)


def flip_patch(arrays: tuple[np.ndarray, ...], axes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The patch mirrored along ``axes``. Mirroring chi along axis i gives the field of the mirrored
    source under B0 with its i-th component negated (the dipole kernel depends on k only through
    (k.b0)^2 / k^2); B0's tilt distribution and every non-dipolar term are symmetric under it, and the
    network never sees B0 itself (its prior channel is mirrored with the field), so a mirrored patch is
    another valid training sample."""
    return tuple(np.flip(a, axes) for a in arrays) if axes else arrays


def batch_loss(net: PDINet, field: torch.Tensor, chi: torch.Tensor, mask: torch.Tensor,
               beta: float = 0.0, prior: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """Eq. 9 on a batch (field, chi, prior in ppm); ``beta`` as in network.gaussian_nll; the network
    runs under bf16 autocast when ``bf16`` (the loss in fp32), in the network's memory layout."""
    x = to_input(field, prior)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        mean, logvar = net(x)
    # the log variance softly limited as at inference (clamp_logvar): an untrained network's extreme
    # outputs would otherwise overflow exp(-logvar) to an infinite loss
    return gaussian_nll(mean.float(), clamp_logvar(logvar.float()), chi * CHI_SCALE, mask, beta)


def _simulate(seed: int, simulation: SimulationConfig, prior: str) -> Sample:
    """One pooled volume from its own seed (runs in a worker process)."""
    torch.set_num_threads(1)
    return with_prior(make_volume(np.random.default_rng(seed), simulation), prior)


class PatchPool:
    """A pool of simulated volumes, refreshed one at a time, from which patches are drawn."""

    def __init__(self, config: TrainConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.prior = PRESETS[config.preset].prior
        self.executor = None
        self.pending = []
        if config.workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.executor = ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"))
            futures = [self._submit() for _ in range(config.pool_size)]
            self.volumes = [f.result() for f in futures]
            self.pending = [self._submit() for _ in range(config.workers)]
        else:
            self.volumes = [self._new() for _ in range(config.pool_size)]

    def _new(self) -> Sample:
        return with_prior(make_volume(self.rng, self.config.simulation), self.prior)

    def _submit(self):
        return self.executor.submit(_simulate, int(self.rng.integers(2**31)), self.config.simulation, self.prior)

    def refresh(self) -> None:
        """Replace a pooled volume: by a fresh one made here, or by those the workers have finished."""
        if self.executor is None:
            self.volumes[int(self.rng.integers(len(self.volumes)))] = self._new()
            return
        for i, future in enumerate(self.pending):
            if future.done():
                self.volumes[int(self.rng.integers(len(self.volumes)))] = future.result()
                self.pending[i] = self._submit()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def batch(self) -> tuple[torch.Tensor, ...]:
        """(field, chi, mask, prior or None) tensors of shape (B, 1, ...)."""
        items = [random_patch(self.volumes[int(self.rng.integers(len(self.volumes)))], self.config.patch, self.rng)
                 for _ in range(self.config.batch_size)]
        if self.config.flips:
            items = [flip_patch(it, tuple(int(a) for a in np.flatnonzero(self.rng.random(3) < 0.5))) for it in items]
        stack = lambda i: torch.from_numpy(np.stack([it[i] for it in items])[:, None].astype(np.float32))  # noqa: E731
        return stack(0), stack(1), stack(2), (stack(3) if len(items[0]) > 3 else None)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def distributed_context(device: str) -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` (WORLD_SIZE > 1) the process group is started here:
    NCCL with one GPU per process, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


@reuse_freed_memory()
def train(config: TrainConfig, checkpoint: Path, log: Callable[[dict], None] = print,
          validation: list[Sample] | None = None, device: str = "cpu", init_from: Path | None = None,
          validation_sharp: list[Sample] | None = None) -> PDINet:
    """Train (or resume from ``checkpoint``) up to ``config.steps`` steps; returns the network.
    A new run may start from the weights of another checkpoint or weights file (``init_from``, see
    ``warm_start``). Each validation scores ``validation`` (record key 'validation') and, when given,
    ``validation_sharp`` (the same brains with one brain's tissue boundaries; 'validation_sharp').

    Under ``torchrun`` each process trains a DistributedDataParallel replica on its own data stream
    (seed + rank); gradients are averaged across processes, so the replicas stay identical (each
    record says whether they do), and rank 0 alone validates, logs and writes the checkpoint.
    """
    start = time.perf_counter()  # max_seconds counts from here (the pool's first volumes included)
    rank, world = distributed_context(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    net = PDINet(PRESETS[config.preset])
    if init_from is not None and not checkpoint.exists():
        warm_start(net, init_from)
    bf16 = use_bf16(config.precision, device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest convolutions
    net = fast_layout(net.to(device), device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed + rank)
    step, history = 0, []
    ema_state = None
    origin = None  # what a resumed checkpoint's weights were made of, when not by this loop alone
    if checkpoint.exists():
        state = read_checkpoint(checkpoint, device)
        if state["preset"] != config.preset:
            raise ValueError(f"{checkpoint}: checkpoint is preset {state['preset']!r}, not {config.preset!r}")
        origin = started_from(json.loads(state["config"]), int(state["step"]))
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = config.lr  # a resumed run may lower the learning rate
        step, history = int(state["step"]), list(state["history"])
        ema_state = state.get("ema")
        if rank == 0:
            rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it to the device
    pool = PatchPool(config, rng)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[local_rank] if device.startswith("cuda") else None)

    ema = None
    if config.ema > 0:
        ema = PDINet(net.config).to(device)
        ema.load_state_dict(ema_state if ema_state is not None else net.state_dict())
        ema.requires_grad_(False)

    def save() -> None:
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        saved_config = {**asdict(config), **({"started_from": origin} if origin else {})}
        save_atomic({"preset": config.preset, "config": json.dumps(saved_config), "model": net.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "history": history,
                     "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(), **extra},
                    checkpoint)

    net.train()
    t0 = time.perf_counter()
    first_step = step
    while step < config.steps:
        elapsed = time.perf_counter() - start
        progress = elapsed / config.max_seconds if config.max_seconds > 0 else (step - first_step) / max(config.steps - first_step, 1)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(config.lr, config.lr_final, progress)
        field_b, chi_b, mask_b, prior_b = (t.to(device) if t is not None else None for t in pool.batch())
        loss = batch_loss(model, field_b, chi_b, mask_b, config.beta, prior_b, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), net.state_dict().values()):
                    e.lerp_(p, 1.0 - config.ema) if e.is_floating_point() else e.copy_(p)
        record = {"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - t0, 2)}
        if config.lr_final > 0:
            record["lr"] = float(f"{opt.param_groups[0]['lr']:.3g}")
        if config.beta:
            record["beta"] = config.beta
        if world > 1:
            record["ranks_agree"] = _replicas_agree(net)
        if step % config.refresh_every == 0:
            pool.refresh()
        last = step == config.steps or _out_of_time(start, config.max_seconds, world, device)
        if rank == 0:
            if validation and (step % config.validate_every == 0 or last):
                scored = ema if ema is not None else net
                record["validation"] = validate(scored, validation, device)
                if validation_sharp:
                    record["validation_sharp"] = validate(scored, validation_sharp, device)
                net.train()
            history.append(record)
            log(record)
            if step % config.checkpoint_every == 0 or last:
                save()
        if last:
            break
    pool.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return net


def _out_of_time(start: float, max_seconds: float, world: int, device: str) -> bool:
    """Whether this run has used its ``max_seconds`` (0: no limit); under torchrun rank 0's clock decides."""
    if max_seconds <= 0:
        return False
    late = time.perf_counter() - start >= max_seconds
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(late)], device=device if device.startswith("cuda") else "cpu")
        dist.broadcast(flag, src=0)
        late = bool(flag.item())
    return late


def started_from(previous: dict, step: int) -> dict | None:
    """The lineage a run resumed from a checkpoint with config ``previous`` (at ``step``) must keep: the weight
    average it continued (``training/average_checkpoints.py``), recorded as {"step", "weight_average"} so that the
    exported manifest, and the model card after it, still say that the weights began as an average; a lineage
    recorded earlier is kept as it is. None for a checkpoint this loop made from scratch."""
    if "weight_average" in previous:  # the checkpoint is an average itself: the newest origin
        return {"step": step, "weight_average": previous["weight_average"]}
    return previous.get("started_from")


def weight_average_of(config: dict) -> dict | None:
    """The weight average a checkpoint's (or manifest's) config says its weights are, or were trained on from."""
    return config.get("weight_average") or config.get("started_from", {}).get("weight_average")


def warm_start(net: PDINet, source: Path) -> list[str]:
    """Copy into ``net`` every weight of ``source`` (a training checkpoint, its moving average when kept,
    or a .safetensors file) whose name and shape fit; a stride-2 transposed convolution becomes the
    1x1x1 convolution of a 'resize' upsampler as its average over the 8 kernel positions (what it does to
    a locally constant input). Returns the names left at their initial values."""
    source = Path(source)
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(source))
    else:
        saved = read_checkpoint(source)
        state = saved.get("ema") or saved["model"]
    own, copied = net.state_dict(), set()
    for name, value in state.items():
        if ".ups." in name and name not in own:  # transposed convolution -> resize's 1x1x1 convolution
            name = name.rsplit(".", 1)[0] + ".1." + name.rsplit(".", 1)[1]
            if value.dim() == 5:
                value = value.mean(dim=(2, 3, 4)).t()[..., None, None, None]
        if name in own and own[name].shape == value.shape:
            own[name] = value.clone()
            copied.add(name)
    net.load_state_dict(own)
    return sorted(set(own) - copied)


def _replicas_agree(net: PDINet) -> bool:
    """Whether every process holds the same weights (max - min of a weight checksum across ranks)."""
    import torch.distributed as dist

    total = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1)
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs() <= 1e-9 * (1 + total.abs()))


@torch.no_grad()
def validate(net: PDINet, samples: list[Sample], device: str = "cpu") -> dict:
    """Whole-volume RMSE (%) and 2-sigma coverage on held-apart simulated volumes."""
    from .inference import predict
    from .metrics import calibration, nrmse, nrmse_demeaned

    rmses, demeaned, cover = [], [], []
    net = net.to(memory_format=torch.contiguous_format)
    for s in samples:
        field = without_mean(s.field, s.mask, s.noise_map)[0]  # as the pipeline feeds it (since session 38)
        mean, std = predict(net, field, s.mask, device=device, geometry=s.geometry)
        rmses.append(nrmse(mean, s.chi, s.mask))
        demeaned.append(nrmse_demeaned(mean, s.chi, s.mask))
        cover.append(calibration(mean, std, s.chi, s.mask)["within_2sigma"])
    return {"rmse": round(float(np.mean(rmses)), 2), "coverage2": round(float(np.mean(cover)), 4),
            "rmse_each": [round(float(r), 2) for r in rmses], "rmse_demeaned": round(float(np.mean(demeaned)), 2)}


def brains_only(config: SimulationConfig) -> SimulationConfig:
    """``config`` without random-shapes volumes (anatomical brains where it has any, else procedural)."""
    anatomical = 1.0 if config.anatomical_fraction > 0 else 0.0
    return SimulationConfig(**{**asdict(config), "brain_fraction": 1.0, "anatomical_fraction": anatomical})


def validation_set(seed: int = 10_000, count: int = 2, config: SimulationConfig = REALISTIC) -> list[Sample]:
    """Held-apart simulated brains (seeds disjoint from training's stream)."""
    return [make_volume(np.random.default_rng(seed + i), brains_only(config)) for i in range(count)]


def validation_sets(count: int, config: SimulationConfig) -> tuple[list[Sample], list[Sample] | None]:
    """The validation brains for a training mix: with the template's tissue boundaries whatever the mix (so
    the curve stays comparable across runs), and when the mix sharpens some (``config.sharp_fraction`` > 0)
    the same seeds sharpened too (a seed keeps its brain, grid and field terms: ``anatomy.anatomical_brain``); never
    with a bleed (``config.bleed_fraction``), a distant field (``config.distant_ppm``), cut to a column or with fine
    texture (``config.texture_fraction``)."""
    config = replace(config, bleed_fraction=0.0, distant_ppm=(0.0, 0.0), column_fraction=0.0,  # as only some mixes have
                     texture_fraction=0.0)
    plain = validation_set(count=count, config=replace(config, sharp_fraction=0.0))
    sharp = validation_set(count=count, config=replace(config, sharp_fraction=1.0)) if config.sharp_fraction > 0 else None
    return plain, sharp


@torch.no_grad()
def recalibrate_batchnorm(net: PDINet, patches: int = 64, seed: int = 50_000,
                          config: SimulationConfig = SimulationConfig()) -> None:
    """Re-estimate batch-norm statistics as plain averages over brain-rich patches of simulated brains.

    With batches of two patches from a mix of brains and random shapes, the running averages kept
    during training follow whichever kind came last; averaging over brain patches afterwards matches
    the data the model is used on (measured at step 1000: validation RMSE 97 % -> 78 %).
    """
    rng = np.random.default_rng(seed)
    volumes = [make_volume(rng, brains_only(config)) for _ in range(4)]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    for i in range(patches):
        patch = random_patch(with_prior(volumes[i % len(volumes)], net.config.prior), TrainConfig.patch, rng, min_fill=0.5)
        as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
        net(to_input(as_tensor(patch[0]), as_tensor(patch[3]) if len(patch) > 3 else None))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = 0.1
    net.eval()


CALIBRATION_SEEDS = (20_000, 20_001, 20_002, 20_003)  # apart from training (0), validation (10000+), benchmarks (30000+)


@torch.no_grad()
def calibrate_std(net: PDINet, samples: list[Sample]) -> float:
    """Set ``net.logvar_offset`` so that the predicted variance matches the squared errors on
    ``samples`` on average (the maximum-likelihood scalar rescaling of sigma^2, as the authors' code
    rescales its variance map); returns the factor applied to sigma."""
    from .defaults import PDI_REFLECTIONS
    from .inference import predict

    net.logvar_offset = 0.0
    ratios = []
    for s in samples:  # as PDI runs by default (with reflections, the variance includes their spread)
        mean, std = predict(net, s.field, s.mask, geometry=s.geometry, reflections=PDI_REFLECTIONS)
        m = s.mask > 0
        ratios.append(((mean[m] - s.chi[m]).astype(np.float64) ** 2 / np.maximum(std[m], 1e-6) ** 2))
    factor2 = float(np.mean(np.concatenate(ratios)))
    net.logvar_offset = math.log(factor2)
    return math.sqrt(factor2)


def kept_history(history: list[dict]) -> list[dict]:
    """The records a checkpoint committed beside its log keeps: the validations (what ``export`` reads); the log
    holds every step, and a checkpoint carrying them all grew by 4 MB every 40 000 steps."""
    return [r for r in history if "validation" in r]


CHECKPOINT_KEYS = ("step", "preset", "config", "model", "history")  # what ``train`` writes and every reader needs


def read_checkpoint(path, device: str = "cpu") -> dict:
    """A training checkpoint (``train``'s .pt), read without unpickling code (``weights_only``); InputError naming the
    file when it is missing, unreadable or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "checkpoint file does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated or foreign file (torch's text is pages about pickles)
        raise InputError(str(path), "not a training checkpoint that loads as plain tensors (torch.load: "
                                    f"{type(exc).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(str(path), f"not a pdiqsm training checkpoint (no {', '.join(missing)})")
    return state


def checkpoint_net(state: dict) -> PDINet:
    """The network of a loaded training checkpoint: its weights' moving average when kept, else the last step's."""
    net = PDINet(PRESETS[state["preset"]])
    net.load_state_dict(state.get("ema") or state["model"])
    return net


def export(checkpoint: Path, out: Path, recalibrate: bool = True, calibrate: bool = False) -> Path:
    """Weights of a training checkpoint as safetensors + manifest (steps, config, last validation),
    with batch-norm statistics re-estimated on simulated brains unless ``recalibrate`` is False, and
    sigma rescaled on held-apart simulated brains (``calibrate_std``) when ``calibrate``."""
    from .weights import save_weights

    if Path(out).suffix.lower() != ".safetensors":
        raise InputError(str(out), "the exported weights must be a .safetensors file (its manifest goes beside it)")
    state = read_checkpoint(checkpoint)
    net = checkpoint_net(state)
    recalibrate = recalibrate and any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    if recalibrate:
        recalibrate_batchnorm(net)
    validations = [r for r in state["history"] if "validation" in r]
    info = {"preset": state["preset"], "steps": int(state["step"]), "train_config": json.loads(state["config"]),
            "last_validation": validations[-1] if validations else None,
            "field_scale": FIELD_SCALE, "chi_scale": CHI_SCALE, "batchnorm_recalibrated": recalibrate,
            "weights": "moving average" if state.get("ema") else "last step"}
    if calibrate:
        samples = [make_volume(np.random.default_rng(seed), brains_only(REALISTIC)) for seed in CALIBRATION_SEEDS]
        info["std_calibration"] = {"sigma_factor": calibrate_std(net, samples), "seeds": list(CALIBRATION_SEEDS)}
    return save_weights(net, out, info)

"""Model weights: safetensors files with a JSON manifest (architecture, sha256, provenance).

A weights file ``NAME.safetensors`` travels with ``NAME.json``; loading checks the file's sha256
against the manifest before anything is deserialised, and the architecture against the tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import InputError
from .network import PDINet, UNetConfig, fast_layout

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
DEFAULT_WEIGHTS = RESOURCES / "models" / "pdi-default.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_weights(net: PDINet, path: Path, info: dict | None = None) -> Path:
    """Write weights (safetensors) and the manifest with their sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp_manifest = path.with_name(path.name + ".json.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
        tmp.chmod(0o644)
        manifest = {"architecture": net.config.to_dict(), "sha256": sha256(tmp),
                    "logvar_offset": float(net.logvar_offset), **(info or {})}
        tmp_manifest.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        tmp.replace(path)  # both files are complete before either is published
        tmp_manifest.replace(manifest_path(path))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return path


def load_model(path: Path | None = None, device: str = "cpu") -> tuple[PDINet, dict]:
    """Network and manifest from ``path`` (default: the bundled model), checksum verified."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise InputError(str(path), "weights file does not exist")
    if path.suffix.lower() != ".safetensors":  # a pickle (.pt, .pth, .ckpt) is never opened
        raise InputError(str(path), "weights must be a .safetensors file with its .json manifest; a training "
                                    "checkpoint becomes one with 'pdiqsm export CHECKPOINT --out NAME.safetensors' "
                                    "(pickled files are never loaded)")
    mpath = manifest_path(path)
    if not mpath.exists():
        raise InputError(str(path), f"no manifest {mpath.name} beside the weights (it holds the checksum)")
    try:
        manifest = json.loads(mpath.read_text())
        config = UNetConfig.from_dict(manifest["architecture"])
        expected = manifest["sha256"]
    except KeyError as exc:
        raise InputError(str(mpath), f"malformed weights manifest: no {exc} entry") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(str(mpath), f"malformed weights manifest: {exc}") from None
    actual = sha256(path)
    if actual != expected:
        raise InputError(str(path), f"checksum mismatch: sha256 {actual[:16]}... but the manifest says {expected[:16]}...")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise InputError(str(path), f"not a readable safetensors file: {exc}") from None
    net = PDINet(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise InputError(str(path), f"weights do not fit architecture {config.filters}: {first}") from None
    net.logvar_offset = float(manifest.get("logvar_offset", 0.0))
    return fast_layout(net.to(device), device).eval(), manifest

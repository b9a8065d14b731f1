"""Config checks that run before anything expensive. Each error names the key and allowed values.

Unknown group options (``model=foo``) are already rejected by Hydra with the list of available
options; here we check values *inside* groups that Hydra cannot type-check.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from edm.errors import ConfigError
from edm.families import FAMILIES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError("device", f"invalid device {spec!r}.", ["auto", "cpu", "cuda", "cuda:N"]) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was requested but is not available on this machine.",
                          ["auto", "cpu"])
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError("model.dtype", f"unknown dtype {name!r}.", list(DTYPES))
    # fp16 matmuls are slow or unsupported on CPUs; bf16 is 2-3x faster than fp32 there.
    if device.type == "cpu" and name == "fp16":
        return torch.bfloat16
    return DTYPES[name]


def _positive_int(cfg: DictConfig, key: str) -> None:
    val = cfg.gen[key]
    if not isinstance(val, int) or val <= 0:
        raise ConfigError(f"gen.{key}", f"must be a positive integer, got {val!r}.")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for bad values in the composed config."""
    s = cfg.sparsity
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
        raise ConfigError("sparsity", f"must be a number in [0, 1), got {s!r}.")
    if cfg.model.family not in FAMILIES:
        raise ConfigError("model.family", f"unknown family {cfg.model.family!r}.", FAMILIES)
    for key in ("num_inference_steps", "height", "width", "batch_size", "num_shards"):
        _positive_int(cfg, key)
    if not isinstance(cfg.gen.shard, int) or not 0 <= cfg.gen.shard < cfg.gen.num_shards:
        raise ConfigError("gen.shard", f"must be in [0, gen.num_shards), got {cfg.gen.shard!r}.")
    g = cfg.gen.guidance_scale
    if not isinstance(g, (int, float)) or g < 0:
        raise ConfigError("gen.guidance_scale", f"must be a number >= 0, got {g!r}.")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise ConfigError("threads", f"must be a positive integer or null, got {cfg.threads!r}.")
    resolve_dtype(cfg.model.dtype, torch.device("cuda"))
    resolve_device(cfg.device)

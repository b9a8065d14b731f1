"""Config checks that run before anything expensive. Each error names the key and allowed values.

Unknown group options (``model=foo``) are already rejected by Hydra with the list of available
options; here we check values *inside* groups that Hydra cannot type-check.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from edm.errors import ConfigError
from edm.families import ARCH, FAMILIES, SCHEDULERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError("model.dtype", f"unknown dtype {dtype!r}.", list(DTYPES))
    return DTYPES[dtype]


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
    to_dtype(name)  # unknown names are a ConfigError
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
    if cfg.model.loader.get("device") == "meta":  # FullSizePipeline: counting only
        raise ConfigError("model.loader.device", "a meta-device pipeline has no values, so it "
                          "cannot generate (schedulers read them); count parameters and FLOPs "
                          "with edm.eval.flops.meta_pipe / meta_step_flops instead.",
                          [None, "cpu", "cuda"])
    validate_model_limits(cfg)
    validate_compile(cfg)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate_compile(cfg: DictConfig) -> None:
    c = cfg.get("compile")
    if not c or not c.get("enabled"):
        return
    if c.get("mode") not in COMPILE_MODES:
        raise ConfigError("compile.mode", f"unknown mode {c.get('mode')!r}.", COMPILE_MODES)
    for key in ("dynamic", "freezing"):
        if c.get(key) not in (None, True, False):
            raise ConfigError(f"compile.{key}", f"must be null, true or false, got "
                              f"{c.get(key)!r}.", [None, True, False])


GUIDANCE = ("cfg", "distilled", "none")


def validate_model_limits(cfg: DictConfig) -> None:
    """``gen.*`` and ``model.loader.scheduler`` against what this model can do (``model.limits``).

    The pipelines themselves reject most of these, but only after the weights are loaded (minutes
    for SDXL, after queueing on a cluster), and some not at all: an epsilon sampler on a
    rectified-flow model runs and returns noise.
    """
    name, lim = cfg.model.name, cfg.model.get("limits")
    if lim is None:
        raise ConfigError("model.limits", f"model={name} declares no limits (size_multiple, "
                          "sizes, guidance); every conf/model/*.yaml must.")
    h, w = cfg.gen.height, cfg.gen.width
    sizes = [list(x) for x in lim.get("sizes") or []]
    if sizes and [h, w] not in sizes:
        raise ConfigError("gen.height", f"model={name} makes only these (height, width): "
                          f"got ({h}, {w}); gen.width must match too.", [tuple(x) for x in sizes])
    m = int(lim.get("size_multiple") or 1)
    for key, val in (("height", h), ("width", w)):
        if val % m:
            lo = max(m, val - val % m)
            raise ConfigError(f"gen.{key}", f"model={name} needs a multiple of {m} (its latent "
                              f"grid), got {val}; nearest: {lo} or {lo + m}.")
    mode = lim.get("guidance", "cfg")
    if mode not in GUIDANCE:
        raise ConfigError("model.limits.guidance", f"unknown guidance mode {mode!r}.", GUIDANCE)
    if mode == "none" and cfg.gen.guidance_scale not in (0, 0.0):
        raise ConfigError("gen.guidance_scale", f"model={name} takes no guidance (it is "
                          f"guidance-distilled or unconditional); got {cfg.gen.guidance_scale}.",
                          [0])
    if mode != "cfg" and cfg.gen.get("negative_prompt"):
        raise ConfigError("gen.negative_prompt", f"model={name} runs without classifier-free "
                          "guidance, so a negative prompt would be ignored.", [None])
    allowed = SCHEDULERS.get(ARCH[cfg.model.family], ())
    for key, sched in (("model.loader.scheduler", cfg.model.loader.get("scheduler")),
                       ("calib.scheduler", cfg.calib.get("scheduler"))):
        if sched is not None and sched not in allowed:
            raise ConfigError(key, f"family {cfg.model.family!r} cannot sample with {sched!r}.",
                              allowed)

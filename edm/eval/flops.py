"""FLOPs and parameter counts of denoisers, with ``torch.utils.flop_counter``.

Conventions (``FlopCounterMode``'s; the table below maps the papers' figures onto them):

* one multiply-add = **2 FLOPs**; only matmuls, convolutions and attention are counted
  (norms, activations, softmax and element-wise ops are ignored);
* attention counts both products, ``Q Kᵀ`` and ``P V`` (``4·B·heads·Nq·Nk·d`` FLOPs);
* "per denoiser call" = one forward of the UNet/MMDiT at the batch it is given; with
  classifier-free guidance the pipelines batch both halves, so one step of one image is a
  batch-2 call. Paper figures are per image (batch 1).

How the papers' numbers come out (measured with :func:`meta_denoiser_flops` on
``edm.models.archs`` full-size models, one call at 1024², see ``tests/test_flops.py``):

=====================================  =========  ==============================================
paper figure                           measured   convention that reproduces it
=====================================  =========  ==============================================
AT-EDM, SD-XL dense "6.7 T"/step       6.761 T    all of the above: 2 FLOPs/MAC, attention
                                                  included, batch 1, 77x2048 context
OBS-Diff Tab. 3, SDXL "5.98 TFLOPs"    5.977 T    same call **without attention products**
                                                  (0.784 T); equally 1 per MAC at CFG batch 2
OBS-Diff Tab. 9, SD3-medium "2.84"     2.836 T    **MACs** (1 per multiply-add), no attention,
                                                  batch 1, **77** text tokens (not 333)
OBS-Diff Tab. 4, SD3.5-large "11.26"   11.256 T   same as SD3-medium
=====================================  =========  ==============================================

So OBS-Diff counts like a module-hook profiler (thop/ptflops: ``nn.Linear``/``nn.Conv2d`` only,
functional attention invisible), reporting MACs for SD3 and either 2x MACs or a CFG batch for
SDXL. Under this module's convention the real per-image calls cost 8.90 T (SD3-medium) and
31.12 T (SD3.5-large) at 1024² with the pipeline's 77 + 256 text tokens.

A trap fixed here: on CPU tensors PyTorch dispatches fused attention to
``aten._scaled_dot_product_flash_attention_for_cpu``, which has no FLOP formula, so
``FlopCounterMode`` silently counts attention as 0. :func:`register_cpu_sdpa_flops` registers
the formula (the same count the meta device gives, where attention decomposes into two
``bmm``\\ s); :func:`flop_counter` always calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """``Q Kᵀ`` plus ``P V``: ``2·B·Hq·Nq·Nk·(d_qk + d_v)`` FLOPs (grouped heads broadcast)."""
    b, h_q, n_q, d_qk = query_shape
    n_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h_q * n_q * n_k * (d_qk + d_v)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def register_cpu_sdpa_flops() -> None:
    """Give the CPU fused-attention op a FLOP formula (idempotent).

    Affects every ``FlopCounterMode`` of the process, which is the point: without it, FLOPs
    measured on CPU tensors miss all attention.
    """
    if _CPU_SDPA not in flop_registry:
        register_flop_formula(_CPU_SDPA)(_cpu_sdpa_flop)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts fused attention on CPU tensors."""
    register_cpu_sdpa_flops()
    return FlopCounterMode(display=False)


def count_params(module: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters of ``module`` (shared tensors counted once).

    Args:
        module: any module; meta parameters are counted by shape.
        nonzero: count only non-zero entries (what unstructured pruning leaves); needs real
            tensors.
    """
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(torch.count_nonzero(p)) if nonzero else p.numel()
    return total


def _denoiser_of(pipe) -> nn.Module:
    from edm.families import adapter

    return adapter(pipe).denoiser(pipe)


def measure_denoiser_flops(pipe, denoiser: nn.Module | None = None, **call_kwargs) -> list[int]:
    """Run ``pipe(**call_kwargs)`` once and return the FLOPs of every denoiser call, in order.

    A pre-forward hook on the denoiser opens a counter and a post-forward hook closes it, so
    everything else (text encoders, VAE, scheduler) is excluded and step-dependent runtime
    methods (e.g. AT-EDM's DSAP, which prunes less in early steps) are measured per step. The
    counts are per call at the call's batch (CFG halves batched together).

    Args:
        pipe: a loaded pipeline (``pipe.edm_family`` set) or any object the family adapter knows.
        denoiser: the module to measure; default the family adapter's denoiser of ``pipe``.
        **call_kwargs: forwarded to ``pipe``, e.g. ``prompt=[...], num_inference_steps=4,
            height=..., width=..., output_type="pt"``.
    """
    denoiser = denoiser if denoiser is not None else _denoiser_of(pipe)
    counts: list[int] = []
    open_counter: list[FlopCounterMode] = []

    def pre(module, args, kwargs):
        counter = flop_counter()
        counter.__enter__()
        open_counter.append(counter)

    def post(module, args, kwargs, output):
        if open_counter:
            counter = open_counter.pop()
            counter.__exit__(None, None, None)
            counts.append(counter.get_total_flops())

    h_pre = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    # always_call: close the counter even when the forward raises, or the mode would leak.
    h_post = denoiser.register_forward_hook(post, with_kwargs=True, always_call=True)
    try:
        pipe(**call_kwargs)
    finally:
        h_pre.remove()
        h_post.remove()
        while open_counter:
            open_counter.pop().__exit__(None, None, None)
    return counts


# Ops that are attention products (Q Kᵀ, P V) in diffusers' UNets and MMDiTs: fused SDPA on
# CPU/GPU, or the two bmms it decomposes into on the meta device. Linears are mm/addmm and
# convolutions are convolution, so the split is exact for these models.
_ATTENTION_OPS = {
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._flash_attention_forward",
    "aten._efficient_attention_forward",
}


def split_flops(counter: FlopCounterMode) -> dict[str, int]:
    """``{"total", "attention", "linear_conv"}`` FLOPs of a finished counter."""
    ops = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in ops.items() if str(k) in _ATTENTION_OPS)
    total = counter.get_total_flops()
    return {"total": total, "attention": attention, "linear_conv": total - attention}


@torch.no_grad()
def meta_denoiser_flops(
    denoiser: nn.Module, sample_inputs: dict[str, Any], exclude_attention: bool = False
) -> int:
    """FLOPs of one ``denoiser(**sample_inputs)`` call, e.g. a full-size model on the meta device.

    Args:
        denoiser: e.g. ``edm.models.archs.build_denoiser("sdxl")`` (meta, instant, no memory).
        sample_inputs: keyword arguments of the call, e.g. ``archs.sample_inputs("sdxl")``;
            tensors must be on the denoiser's device.
        exclude_attention: count only linears and convolutions (what module-hook counters such
            as thop/ptflops see; OBS-Diff's tables use this convention, see module docstring).
    """
    with flop_counter() as counter:
        denoiser(**sample_inputs)
    return split_flops(counter)["linear_conv" if exclude_attention else "total"]


@torch.no_grad()
def meta_step_flops(
    denoiser: nn.Module, sample_inputs: dict[str, Any], scheduler, num_inference_steps: int
) -> list[int]:
    """FLOPs of each denoiser call of a ``num_inference_steps`` trajectory, without a pipeline.

    Full-size pipelines cannot run end to end on the meta device (schedulers call ``.item()``),
    so this replays what the pipeline does to the denoiser: one call per scheduler timestep,
    in order, with ``timestep`` set to that step's value. Runtime methods that key on the step
    (``edm.state.StepTracker`` reads the scheduler's timesteps) see the same sequence as in a
    real run, e.g. AT-EDM's DSAP pruning less in the first steps.

    Args:
        denoiser: e.g. a meta full-size denoiser with a runtime method installed.
        sample_inputs: one call's keyword arguments (``edm.models.archs.sample_inputs``).
        scheduler: the pipeline's scheduler (its ``set_timesteps`` is called).
        num_inference_steps: trajectory length.
    """
    scheduler.set_timesteps(num_inference_steps, **_shift_kwargs(scheduler, sample_inputs))
    key = "timestep"
    ref = sample_inputs[key]
    counts = []
    for t in scheduler.timesteps:
        inputs = dict(sample_inputs)
        inputs[key] = torch.full_like(ref, float(t))
        counts.append(meta_denoiser_flops(denoiser, inputs))
    return counts


def _shift_kwargs(scheduler, sample_inputs: dict[str, Any]) -> dict[str, float]:
    """FLUX.1's schedulers shift the sigmas by the image token count (``use_dynamic_shifting``):
    ``set_timesteps`` needs the ``mu`` FluxPipeline would pass for these packed latents."""
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        return {}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    tokens = sample_inputs["hidden_states"].shape[1]  # packed [B, tokens, 64]
    return {"mu": calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len,
                                  c.base_shift, c.max_shift)}


def analytic_mmdit_flops(config: dict[str, Any], height: int, width: int, context_len: int) -> int:
    """Closed-form FLOPs of one batch-1 ``SD3Transformer2DModel`` call: a sanity check.

    Counts, at 2 FLOPs per multiply-add: patch embedding, context embedder, per block the image
    and context QKV / output / 4x-GELU FFN projections, joint attention over image + context
    tokens, SD3.5's extra image-only attention in ``dual_attention_layers``, the final
    projection; the per-sample AdaLN/time-embedding matmuls (independent of the token count)
    are included too. ``height``/``width`` in pixels (latent = /8).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, c_in = config["patch_size"], config["in_channels"]
    c_out = config.get("out_channels") or c_in
    n_img = (height // 8 // p) * (width // 8 // p)
    n_ctx, layers = context_len, config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    t_dim, pooled = 256, config["pooled_projection_dim"]
    macs = n_img * p * p * c_in * d  # patch embedding conv
    macs += n_ctx * config["joint_attention_dim"] * d  # context_embedder
    macs += t_dim * d + d * d + pooled * d + d * d  # timestep + pooled-text MLPs
    for i in range(layers):
        last = i == layers - 1  # context_pre_only: the text stream ends after its QKV
        macs += n_img * 12 * d * d  # qkv (3), out (1), FFN 4x up and down (8)
        macs += n_ctx * (3 if last else 12) * d * d
        macs += 2 * (n_img + n_ctx) ** 2 * d  # joint QKᵀ and PV
        macs += d * (9 if i in dual else 6) * d  # AdaLN-zero of the image stream
        macs += d * (2 if last else 6) * d  # AdaLN of the text stream
        if i in dual:
            macs += n_img * 4 * d * d + 2 * n_img * n_img * d
    macs += d * 2 * d + n_img * d * p * p * c_out  # final AdaLN + projection
    return 2 * macs


def meta_pipe(arch: str, height: int | None = None, width: int | None = None, batch: int = 1):
    """A full-size denoiser on the meta device in a pipe-like holder, and one call's inputs.

    ``Method.apply`` needs only the denoiser attribute, ``scheduler`` (the family's default, for
    :func:`trajectory_flops`) and ``edm_family``; nothing is allocated.
    """
    import types

    from edm.models import archs
    from edm.models.components import default_scheduler

    spec = archs.arch_spec(arch)
    denoiser = archs.build_denoiser(arch)
    inputs = archs.sample_inputs(arch, height=height, width=width, batch_size=batch)
    attr = "unet" if spec.is_unet else "transformer"
    pipe = types.SimpleNamespace(**{attr: denoiser}, scheduler=default_scheduler(spec.family),
                                 edm_family=spec.family)
    return pipe, inputs


def trajectory_flops(pipe, inputs: dict[str, Any], method=None, num_steps: int = 10,
                     cfg_batch: bool = False) -> float:
    """Average FLOPs per denoiser call over a ``num_steps`` trajectory with ``method`` applied.

    Step-dependent methods (DSAP) differ only in their first ``tau`` steps, so those are counted
    one by one and the rest once. ``cfg_batch``: the inputs are a classifier-free-guidance pair
    (on meta, latents have no values to detect it from).
    """
    from edm.methods.base import ApplyContext

    denoiser = _denoiser_of(pipe)
    if method is None:
        return float(meta_denoiser_flops(denoiser, inputs))
    dsap = getattr(method, "dsap", None)
    tau = min(dsap.tau(num_steps), num_steps - 1) if dsap is not None and dsap.enabled else 0
    pipe.scheduler.set_timesteps(num_steps, **_shift_kwargs(pipe.scheduler, inputs))
    method.apply(pipe, ApplyContext(family=pipe.edm_family, meta_cfg_batch=cfg_batch))
    try:
        counts = []
        for t in pipe.scheduler.timesteps[: tau + 1]:  # the step tracker counts these calls
            call = dict(inputs, timestep=torch.full_like(inputs["timestep"], float(t)))
            counts.append(float(meta_denoiser_flops(denoiser, call)))
    finally:
        method.remove(pipe)
    return (sum(counts[:tau]) + (num_steps - tau) * counts[tau]) / num_steps


def bisect_to_flops(flops_of, target: float, lo: float, hi: float, iters: int = 10,
                    digits: int = 4) -> tuple[float, float]:
    """The parameter in ``[lo, hi]`` whose FLOPs are nearest ``target``, by bisection.

    ``flops_of(x)`` must fall monotonically with ``x`` (a pruning or merge ratio). Returns
    ``(x, flops_of(x))``; ``hi`` itself when even it stays above the target.
    """
    best = (hi, flops_of(hi))
    if best[1] >= target:
        return best
    for _ in range(iters):
        mid = round((lo + hi) / 2, digits)
        f = flops_of(mid)
        if abs(f - target) < abs(best[1] - target):
            best = (mid, f)
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best

"""Architecture-faithful full-size denoisers with random weights (no download, optionally on meta).

The configs below are the ``unet/config.json`` / ``transformer/config.json`` of the real hub
repositories (checked against several public copies of those files and against the published
parameter counts, see ``tests/test_models.py``). They let FLOPs and latency of the *real*
architectures be measured on a machine without weights:

* on the ``meta`` device nothing is allocated, so FLOPs of SD3.5-large (8 B parameters) are
  counted in seconds (``edm.eval.flops.meta_denoiser_flops``);
* on ``cpu`` the weights are random (``N(0, 1/fan_in)``), which is enough for timing.

Known traps, written down because they cost time:

* the diffusers default ``SD3Transformer2DModel()`` is *none* of the released models (18 layers,
  1152 wide); SD3.5-medium has ``dual_attention_layers`` 0..12 (an extra image-only attention in
  those blocks), RMS qk-norm and a 384 position-embedding grid; SD3.5-large has qk-norm but no
  dual attention;
* SD1.x's ``attention_head_dim: 8`` is really the number of heads (a historic misnomer that
  diffusers keeps); SD2.x and SDXL give heads per level (``[5, 10, 20, ...]``, 64 channels each).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from edm.models.random_weights import materialize

_SD_UNET_COMMON = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

_SD_MMDIT_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}


@dataclass(frozen=True)
class ArchSpec:
    """One real denoiser architecture and the conditioning shapes its pipeline feeds it.

    Attributes:
        name: ``sd15``, ``sd21``, ``sdxl``, ``sd3_medium``, ``sd35_medium``, ``sd35_large``.
        family: the edm family (``edm.families``) of pipelines using it.
        cls: ``UNet2DConditionModel`` or ``SD3Transformer2DModel``.
        config: constructor keyword arguments (the hub ``config.json`` minus bookkeeping keys).
        resolution: native image side in pixels (the model card's default).
        text_dims: hidden sizes of the text encoders (CLIP-L, OpenCLIP-H/bigG; T5 for SD3).
        context_len: text tokens the denoiser attends to (77 for UNets; 77 CLIP + 256 T5 for
            SD3 pipelines; without T5 the pipeline feeds 256 zero tokens instead, so the
            denoiser still sees 333 unless ``max_sequence_length`` is lowered).
        pooled_dim: pooled text embedding size (SDXL ``text_embeds``; SD3 ``pooled_projections``).
        params: the published parameter count of the denoiser (rounded as published).
        params_rtol: relative tolerance of ``params`` (rounding of the published figure).
        params_note: where ``params`` comes from.
        params_with_pos_embed: the published figure also counts the sin-cos position table,
            which diffusers keeps as a buffer (SD3.5-medium).
    """

    name: str
    family: str
    cls: str
    config: dict[str, Any]
    resolution: int
    text_dims: tuple[int, ...]
    context_len: int = 77
    pooled_dim: int = 0
    params: float = 0.0
    params_rtol: float = 0.002
    params_note: str = ""
    params_with_pos_embed: bool = False

    @property
    def is_unet(self) -> bool:
        return self.cls == "UNet2DConditionModel"

    @property
    def is_flux(self) -> bool:
        return self.cls == "FluxTransformer2DModel"


ARCHS: dict[str, ArchSpec] = {
    "sd15": ArchSpec(
        name="sd15",
        family="sd15",
        cls="UNet2DConditionModel",
        config=dict(
            _SD_UNET_COMMON,
            sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=8,  # = 8 heads (see module docstring)
            cross_attention_dim=768,
        ),
        resolution=512,
        text_dims=(768,),
        params=859.52e6,
        params_note="SD1.5 UNet, 859.52 M",
    ),
    "sd21": ArchSpec(
        name="sd21",
        family="sd21",
        cls="UNet2DConditionModel",
        config=dict(
            _SD_UNET_COMMON,
            sample_size=64,  # 2.1-base (512 px); the 768 px v-model uses 96
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        ),
        resolution=512,
        text_dims=(1024,),
        params=865.9e6,
        params_note="SD2.x UNet, 865.9 M",
    ),
    "sdxl": ArchSpec(
        name="sdxl",
        family="sdxl",
        cls="UNet2DConditionModel",
        config=dict(
            _SD_UNET_COMMON,
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            # 1280 pooled OpenCLIP-bigG + 6 micro-conditioning ids x 256
            projection_class_embeddings_input_dim=2816,
        ),
        resolution=1024,
        text_dims=(768, 1280),
        pooled_dim=1280,
        params=2.567e9,
        params_note="SDXL UNet, 2.567 B (SDXL report; OBS-Diff Table 3: 2.57 B)",
    ),
    "sd3_medium": ArchSpec(
        name="sd3_medium",
        family="sd3",
        cls="SD3Transformer2DModel",
        config=dict(
            _SD_MMDIT_COMMON,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=192,
        ),
        resolution=1024,
        text_dims=(768, 1280, 4096),
        context_len=77 + 256,
        pooled_dim=2048,
        params=2.03e9,
        params_note="OBS-Diff Table 9: 2.03 B",
    ),
    "sd35_medium": ArchSpec(
        name="sd35_medium",
        family="sd3",
        cls="SD3Transformer2DModel",
        config=dict(
            _SD_MMDIT_COMMON,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        resolution=1024,
        text_dims=(768, 1280, 4096),
        context_len=77 + 256,
        pooled_dim=2048,
        # 2.243 B parameters + a 384x384x1536 sin-cos table (226 M) that the checkpoint
        # stores as a tensor and diffusers as a buffer: 2.47 B, marketed as "2.5 B".
        params=2.5e9,
        params_rtol=0.02,
        params_note="Stability AI: 2.5 B, counting the 226 M pos-embed table",
        params_with_pos_embed=True,
    ),
    "sd35_large": ArchSpec(
        name="sd35_large",
        family="sd3",
        cls="SD3Transformer2DModel",
        config=dict(
            _SD_MMDIT_COMMON,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        resolution=1024,
        text_dims=(768, 1280, 4096),
        context_len=77 + 256,
        pooled_dim=2048,
        params=8.06e9,
        params_note="OBS-Diff Table 4: 8.06 B (Stability AI: 8 B)",
    ),
}


# FLUX.1 (black-forest-labs/FLUX.1-dev, -schnell: transformer/config.json): 19 double-stream
# (joint attention, image and text streams) and 38 single-stream blocks, 24 heads x 128, rotary
# positions from (3-axis) image/text ids, 2x2-packed 16-channel latents (64 input channels).
# dev is guidance-distilled: a guidance embedding instead of CFG; schnell has none. The family
# adapter (issue 12) is not written yet: these specs serve parameter and FLOPs counts only.
_FLUX_COMMON = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
ARCHS.update({
    "flux_dev": ArchSpec(
        name="flux_dev",
        family="flux",
        cls="FluxTransformer2DModel",
        config=dict(_FLUX_COMMON, guidance_embeds=True),
        resolution=1024,
        text_dims=(768, 4096),
        context_len=512,  # T5 max_sequence_length of the dev pipeline
        pooled_dim=768,
        params=11.9e9,
        params_note="FLUX.1-dev transformer, 11.9 B (BFL: '12 B')",
    ),
})
# schnell: the same transformer without the guidance embedding; its pipeline feeds 256 T5 tokens
ARCHS["flux_schnell"] = replace(
    ARCHS["flux_dev"], name="flux_schnell", config=dict(_FLUX_COMMON, guidance_embeds=False),
    context_len=256, params_note="FLUX.1-schnell transformer, 11.9 B (no guidance embedding)")


def arch_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` called ``name``; raises ``ConfigError`` listing the known ones."""
    if name not in ARCHS:
        from edm.errors import ConfigError

        raise ConfigError("model.loader.arch", f"unknown architecture {name!r}.", list(ARCHS))
    return ARCHS[name]


def build_denoiser(
    arch: str | ArchSpec,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """Build the full-size denoiser of ``arch`` with random weights.

    Args:
        arch: a key of :data:`ARCHS` (``sd15``, ``sd21``, ``sdxl``, ``sd3_medium``,
            ``sd35_medium``, ``sd35_large``) or an :class:`ArchSpec`.
        device: ``meta`` (default: no memory, for FLOPs and parameter counts) or a real device
            (random weights, for latency). SDXL needs 10 GB in fp32 / 5 GB in bf16 on ``cpu``.
        dtype: parameter dtype.
        seed: seed of the random weights.
    """
    import diffusers
    from accelerate import init_empty_weights

    spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
    cls = getattr(diffusers, spec.cls)
    if torch.device(device).type == "meta":
        with torch.device("meta"):  # everything on meta, buffers included: instant, no memory
            model = cls(**spec.config)
        model.eval().requires_grad_(False)
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules (none here).
        return nn.Module.to(model, dtype=dtype)
    # Parameters on meta, buffers real: buffers such as SD3's sin-cos position table are
    # computed in __init__, so materialize() only has to fill parameters.
    with init_empty_weights(include_buffers=False):
        model = cls(**spec.config)
    model.eval().requires_grad_(False)
    return materialize(model, device, dtype, seed)


def sample_inputs(
    arch: str | ArchSpec,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    context_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call as the real pipeline makes it.

    Args:
        arch: architecture name or spec.
        height, width: image size in pixels (default: the model's native resolution); the
            latent is 8x smaller.
        batch_size: denoiser batch (with classifier-free guidance the pipelines batch the
            unconditional and conditional halves, so a CFG step of one image is ``2``).
        context_len: text tokens; default 77 for UNets and 77 + 256 for SD3 (CLIP + T5 with
            ``max_sequence_length=256``, also without T5: zeros then). OBS-Diff's SD3 TFLOPs
            use 77 (see ``edm.eval.flops``).
    """
    spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
    h, w = (height or spec.resolution) // 8, (width or spec.resolution) // 8
    n_ctx = context_len or spec.context_len
    kw = {"device": device, "dtype": dtype}
    channels = spec.config["in_channels"]
    sample = torch.zeros(batch_size, channels, h, w, **kw)
    timestep = torch.full((batch_size,), 500.0, **kw)
    if spec.is_unet:
        ctx = torch.zeros(batch_size, n_ctx, spec.config["cross_attention_dim"], **kw)
        out = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ctx}
        if spec.config.get("addition_embed_type") == "text_time":
            out["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch_size, spec.pooled_dim, **kw),
                "time_ids": torch.zeros(batch_size, 6, **kw),
            }
        return out
    ctx = torch.zeros(batch_size, n_ctx, spec.config["joint_attention_dim"], **kw)
    if spec.is_flux:  # 16-channel latent packed 2x2 into 64-channel tokens, rotary ids per token
        grid = (h // 2) * (w // 2)
        out = {
            "hidden_states": torch.zeros(batch_size, grid, channels, **kw),
            "timestep": timestep / 1000,  # the Flux pipeline passes t in [0, 1]
            "encoder_hidden_states": ctx,
            "pooled_projections": torch.zeros(batch_size, spec.pooled_dim, **kw),
            "img_ids": torch.zeros(grid, 3, **kw),
            "txt_ids": torch.zeros(n_ctx, 3, **kw),
        }
        if spec.config.get("guidance_embeds"):
            out["guidance"] = torch.full((batch_size,), 3.5, **kw)
        return out
    return {
        "hidden_states": sample,
        "timestep": timestep,
        "encoder_hidden_states": ctx,
        "pooled_projections": torch.zeros(batch_size, spec.pooled_dim, **kw),
    }


# DDPM CIFAR-10 (google/ddpm-cifar10-32 unet/config.json minus UNet2DModel defaults; Table 10):
# 35.75 M; 6.05 G conv+linear MACs at 32x32, the tables' "6.1 G" (6.22 G with attention).
ARCHS["ddpm_cifar10"] = ArchSpec(
    name="ddpm_cifar10", family="ddpm", cls="UNet2DModel", resolution=32, text_dims=(),
    context_len=0, params=35.7e6, params_note="OBS-Diff Table 10, Diff-Pruning: 35.7 M",
    config={"sample_size": 32, "block_out_channels": (128, 256, 256, 256),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False,
            "freq_shift": 1, "norm_eps": 1e-6})

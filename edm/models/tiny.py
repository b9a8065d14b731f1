"""Tiny random-weight pipelines of each family, built offline from configs (tests and debug runs).

They build in a fraction of a second and run 2 steps in well under a second on a CPU
(denoisers of 0.1-0.9 M parameters; the text encoders' 49k-token embeddings are the largest
tensors), yet keep the structure the methods depend on:

* ``tiny_sd15``: cross-attention at the two highest-resolution levels, a plain last level, a
  mid block with attention, 2 ResNets per down block (3 per up block) as in SD1.5;
* ``tiny_sdxl``: no attention at the highest-resolution level, 2 transformer layers per
  attention block at the lower levels and in the mid block (``transformer_layers_per_block``
  > 1, so "prune after the first layer" has a place to act), two text encoders, the
  ``text_time`` added embedding (pooled text + 6 micro-conditioning ids);
* ``tiny_ddpm``: an unconditional pixel-space ``UNet2DModel`` shaped like DDPM CIFAR-10's
  (self-attention at one level, no text encoder, no VAE: 3x16x16 images);
* ``tiny_sd3``: an MMDiT with 3 joint blocks (the last is ``context_pre_only``; a middle one
  exists for "exclude first and last block" rules), two CLIP encoders and
  ``text_encoder_3=None`` (T5 dropped: the pipeline feeds zeros for its 256 tokens).

All use the real CLIP tokenizer (``edm.models.tokenizers``, 77 tokens, no download) and a
2-level VAE (latent = image / 2), so a 32x32 image has a 16x16 latent. Construction is seeded
and does not touch the global RNG.
"""

from __future__ import annotations

import inspect

import torch

from edm.models.components import (
    OPENCLIP_PAD,
    clip_text_encoder,
    default_scheduler,
    scheduler_class,
    set_scheduler,
    t5_tokenizer,
    tiny_vae,
    tokenizer,
)
from edm.validate import to_dtype


def _seeded(seed: int, fn, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(**kwargs).eval()


def tiny_sd15(seed: int = 0):
    """Tiny ``StableDiffusionPipeline`` (SD1.5 structure, DDIM scheduler, no safety checker)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = _seeded(
        seed,
        UNet2DConditionModel,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,  # SD1.x semantics: number of heads
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(4, seed=seed + 1),
        text_encoder=clip_text_encoder(32, seed=seed + 2),
        tokenizer=tokenizer(),
        scheduler=default_scheduler("sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.edm_family = "sd15"
    return pipe


def tiny_sdxl(seed: int = 0):
    """Tiny ``StableDiffusionXLPipeline`` (SDXL structure, Euler scheduler as in SDXL base)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    te1_dim, te2_dim, time_dim = 32, 32, 8
    unet = _seeded(
        seed,
        UNet2DConditionModel,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(1, 2, 4),  # heads per level, as SDXL's [5, 10, 20]
        cross_attention_dim=te1_dim + te2_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2_dim,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(4, seed=seed + 1),
        text_encoder=clip_text_encoder(te1_dim, seed=seed + 2),
        text_encoder_2=clip_text_encoder(te2_dim, projection_dim=te2_dim, seed=seed + 3),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(OPENCLIP_PAD),
        scheduler=default_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.edm_family = "sdxl"
    return pipe


def tiny_sd3(
    seed: int = 0,
    num_layers: int = 3,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
):
    """Tiny ``StableDiffusion3Pipeline`` (MMDiT, flow matching, ``text_encoder_3=None``).

    Args:
        seed: weight seed.
        num_layers: joint blocks; >= 2 so context-branch linears (``attn.to_add_out``,
            ``ff_context``) exist (the last block is ``context_pre_only``). Default 3.
        qk_norm: ``"rms_norm"`` for SD3.5-style blocks; ``None`` as in SD3-medium.
        dual_attention_layers: SD3.5-medium's extra image-only attention (``attn2``) blocks.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    te_dim = 32
    transformer = _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        # the pipeline pads the two CLIP embeddings (2 x 32) up to T5's width, as 2048 -> 4096
        joint_attention_dim=96,
        caption_projection_dim=32,  # must equal heads x head_dim
        pooled_projection_dim=2 * te_dim,
        pos_embed_max_size=32,
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=tiny_vae(16, sd3=True, seed=seed + 1),
        text_encoder=clip_text_encoder(te_dim, projection_dim=te_dim, seed=seed + 2),
        text_encoder_2=clip_text_encoder(te_dim, projection_dim=te_dim, seed=seed + 3),
        text_encoder_3=None,
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(OPENCLIP_PAD),
        tokenizer_3=None,
        scheduler=default_scheduler("sd3"),
    )
    pipe.edm_family = "sd3"
    return pipe


def tiny_flux(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2,
              guidance_embeds: bool = True):
    """Tiny ``FluxPipeline``: double- and single-stream blocks with rotary positions, a CLIP
    encoder for the pooled embedding and a T5 encoder for the sequence, both with offline
    tokenizers, flow-match Euler with FLUX.1's dynamic shift. ``guidance_embeds`` (dev) or not
    (schnell). A 2-level VAE with 4 latent channels, packed 2x2 into 16-channel tokens, so a
    32x32 image is 8x8 = 64 image tokens."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    te_dim, t5_dim = 16, 32
    t5_tok = t5_tokenizer()
    transformer = _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=te_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # sums to the head dim, as (16, 56, 56) does to 128
    )
    t5 = _seeded(seed + 3, T5EncoderModel, config=T5Config(
        vocab_size=len(t5_tok), d_model=t5_dim, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    pipe = FluxPipeline(
        transformer=transformer,
        vae=tiny_vae(4, sd3=True, seed=seed + 1),  # FLUX's VAE also has shift + scale, no quant conv
        text_encoder=clip_text_encoder(te_dim, seed=seed + 2),
        tokenizer=tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        scheduler=default_scheduler("flux"),
    )
    pipe.edm_family = "flux"
    return pipe


def tiny_ddpm(seed: int = 0):
    """Tiny unconditional DDPM (``edm.models.ddpm_pipeline.DDPMUncondPipeline``): a pixel-space
    ``UNet2DModel`` shaped like ``google/ddpm-cifar10-32`` -- ResNet levels, plain self-attention
    at the second level only (down and up), no text -- on 3x16x16 images, with DDPM's linear
    betas under a DDIM sampler (the CIFAR-10 config's ``clip_sample`` kept)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from edm.models.ddpm_pipeline import DDPMUncondPipeline

    unet = _seeded(
        seed,
        UNet2DModel,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head per attention layer, as in the CIFAR-10 model
        norm_num_groups=4,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    scheduler = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=True)
    pipe = DDPMUncondPipeline(unet=unet, scheduler=scheduler)
    pipe.edm_family = "ddpm"
    return pipe


TINY_BUILDERS = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
TINY_BUILDERS["ddpm"] = tiny_ddpm


class TinyPipeline:
    """Loader of ``conf/model/tiny_*.yaml``: a tiny random-weight pipeline, no download.

    Args:
        kind: ``sd15``, ``sdxl``, ``sd3``, ``flux`` or ``ddpm`` (which builder of this module).
        seed: weight seed (the same seed gives the same weights on every machine).
        scheduler: optional diffusers scheduler class name replacing the default (as for
            :class:`edm.models.zoo.HubPipeline`), e.g. ``PNDMScheduler`` to mimic SD1.5.
        **builder_kwargs: passed to the builder (``tiny_sd3``: ``num_layers``, ``qk_norm``,
            ``dual_attention_layers``).
    """

    def __init__(self, kind: str, seed: int = 0, scheduler: str | None = None, **builder_kwargs):
        from edm.errors import ConfigError

        if kind not in TINY_BUILDERS:
            raise ConfigError(
                "model.loader.kind", f"unknown tiny model {kind!r}.", list(TINY_BUILDERS)
            )
        try:
            inspect.signature(TINY_BUILDERS[kind]).bind(seed=seed, **builder_kwargs)
        except TypeError as err:
            raise ConfigError("model.loader", f"bad arguments for tiny_{kind}: {err}.") from None
        self.kind, self.seed, self.scheduler = kind, seed, scheduler
        self.builder_kwargs = builder_kwargs
        scheduler_class(scheduler)

    def check(self) -> None:
        """Nothing to fetch: weights are random, the tokenizer comes from open_clip's package."""

    def load(self, family: str, dtype, device):
        from edm.errors import ConfigError

        if family != self.kind:
            raise ConfigError(
                "model.family",
                f"tiny_{self.kind} is family {self.kind!r}, got {family!r}.",
                [self.kind],
            )
        pipe = TINY_BUILDERS[self.kind](seed=self.seed, **self.builder_kwargs)
        set_scheduler(pipe, self.scheduler)
        dtype = to_dtype(dtype)
        pipe = pipe.to(device)
        # Built in fp32; skipping the no-op cast avoids a diffusers warning.
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.edm_family = family
        return pipe

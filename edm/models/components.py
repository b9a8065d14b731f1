"""Stand-in components shared by the tiny and full-size random pipelines, and scheduler overrides.

The tiny pipelines (``edm.models.tiny``) and the full-size architecture stand-ins
(``edm.models.zoo.full_pipeline``) both need an offline CLIP tokenizer, small CLIP text
encoders, a small VAE and each family's default scheduler; every loader validates and applies a
``model.loader.scheduler`` override the same way.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from edm.errors import ConfigError
from edm.models.tokenizers import VOCAB_SIZE, clip_tokenizer

log = logging.getLogger(__name__)

# OpenCLIP (SDXL/SD3 second encoder) pads with "!" (id 0); CLIP-L pads with <|endoftext|>.
OPENCLIP_PAD = "!"


@functools.lru_cache(maxsize=4)
def tokenizer(pad_token: str | None = None):
    # Building the 49k-token BPE takes ~0.15 s; pipelines never mutate their tokenizers, so
    # tiny pipelines share one per padding convention.
    return clip_tokenizer(pad_token=pad_token) if pad_token else clip_tokenizer()


def clip_text_encoder(
    hidden_size: int,
    projection_dim: int | None = None,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
):
    """A random CLIP text encoder on the real vocabulary (77 positions).

    Args:
        hidden_size: width; stand-ins for full-size pipelines use the real one (768 CLIP-L,
            1024 OpenCLIP-H, 1280 OpenCLIP-bigG) so the denoiser sees real context shapes.
        projection_dim: if given, a ``CLIPTextModelWithProjection`` (pooled ``text_embeds`` of
            this size, used by SDXL's second encoder and both SD3 encoders).
        num_layers: transformer layers; SDXL reads ``hidden_states[-2]``.
        intermediate_size: MLP width (default ``4 * hidden_size``).
        seed: weight seed.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64) if hidden_size >= 64 else 2,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,  # pooled output = hidden state at the first EOS
        pad_token_id=VOCAB_SIZE - 1,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def t5_tokenizer():
    """An offline T5 (SentencePiece-Unigram) tokenizer over characters: the real tokenizer class
    and special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), a vocabulary small enough for tiny
    T5 encoders. Every text tokenizes (one piece per character, ``▁`` marks word starts)."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_vae(latent_channels: int = 4, levels: int = 2, sd3: bool = False, seed: int = 0):
    """A small ``AutoencoderKL``; ``levels`` blocks downsample by ``2**(levels-1)``."""
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {}
    if sd3:  # SD3's VAE: 16 channels, shift + scale, no (post-)quant conv
        extra = {
            "shift_factor": 0.0609,
            "scaling_factor": 1.5305,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(8,) * levels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            **extra,
        ).eval()


def default_scheduler(family: str):
    """The scheduler each family's tiny/full-size stand-in uses (a config YAML may override it).

    SD1.5 ships PNDM, whose PLMS warm-up calls the UNet ``steps + 1`` times; DDIM keeps one call
    per step, which the tests rely on. SDXL base ships Euler (leading spacing); SD3 flow-match
    Euler with shift 3.
    """
    import diffusers

    name, kwargs = _SCHEDULERS[family]
    return getattr(diffusers, name)(**kwargs)


_SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_SCHEDULERS = {
    "sd15": ("DDIMScheduler", dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False)),
    "sd21": ("DDIMScheduler", dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False)),
    "sdxl": ("EulerDiscreteScheduler", dict(_SD_BETAS, timestep_spacing="leading")),
    "sd3": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    # FLUX.1's scheduler_config.json: the shift grows with the image's token count (mu)
    "flux": ("FlowMatchEulerDiscreteScheduler", {
        "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096}),
}


def scheduler_class(name: str | None, key: str = "model.loader.scheduler"):
    """Validate a scheduler override (a diffusers class name, e.g. ``EulerDiscreteScheduler``);
    ``key`` is the config key an error names."""
    if name is None:
        return None
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        allowed = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise ConfigError(key, f"unknown scheduler {name!r}.", allowed)
    return cls


def set_scheduler(pipe, name: str | None) -> None:
    cls = scheduler_class(name)
    if cls is not None:
        # from_config keeps the model's betas / timestep spacing / prediction type.
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        log.info("Scheduler overridden <model.loader.scheduler=%s>", name)

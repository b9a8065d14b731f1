"""Build, save and load the digits model's components.

A checkpoint is a folder with ``config.json`` (UNet / text-encoder / scheduler / tokenizer
configs plus training metadata) and ``model.safetensors`` (``unet.*`` and ``text_encoder.*``
tensors). The text encoder is a frozen random-init CLIP text model, but its weights are shipped
anyway: random init is not guaranteed to be stable across ``transformers`` versions.

UNet presets (measured in the README): ``small`` is the 0.39 M-parameter prototype (channels
16/32/32), ``base`` widens it to 32/64/64. Both are Stable-Diffusion-shaped: cross-attention
transformer blocks (attn1 self-attention, attn2 cross-attention, GEGLU feed-forward) at 16x16,
8x8 and in the mid block -- 7 ``BasicTransformerBlock``s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from edm.digits.data import DIGIT_WORDS, IMAGE_SIZE, TRAIN_TEMPLATES, digit_prompt
from edm.digits.tokenizer import WordTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

TEXT_DIM = 32

_UNET_COMMON = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_DIM,
    "norm_num_groups": 8,
    "use_linear_projection": False,  # SD1.5-style conv proj_in/proj_out
}

UNET_PRESETS = {
    # attention_head_dim is diffusers' (misnamed) number of heads per block: head dim 16 in all
    # (head dim 8 made CPU training 1.7x slower for the same FLOPs).
    "small": dict(_UNET_COMMON, block_out_channels=(16, 32, 32), attention_head_dim=(1, 2, 2)),
    "base": dict(_UNET_COMMON, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4)),
}

TEXT_ENCODER_CONFIG = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",  # cosine schedule: better than linear at low resolution
    "prediction_type": "epsilon",
    "clip_sample": True,  # pixel space in [-1, 1]: clipping x0 is exact, not a hack
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,  # the last DDIM step returns the clean x0 estimate
    "timestep_spacing": "trailing",  # start sampling at t=999 (pure noise) with few steps
    "steps_offset": 0,
}


def default_tokenizer() -> WordTokenizer:
    """Vocabulary: the words of every training template for every digit (ids are stable)."""
    texts = [digit_prompt(d, t) for t in TRAIN_TEMPLATES for d in range(10)]
    texts += list(DIGIT_WORDS) + [str(d) for d in range(10)] + ["number digit of picture image"]
    return WordTokenizer.from_texts(texts, model_max_length=TEXT_ENCODER_CONFIG["max_position_embeddings"])


def default_config(preset: str = "small") -> dict:
    """The full model config for a UNet preset (``small`` or ``base``)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown digits preset {preset!r}; allowed: {', '.join(UNET_PRESETS)}")
    tok = default_tokenizer()
    return {
        "preset": preset,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_PRESETS[preset].items()},
        "text_encoder": dict(TEXT_ENCODER_CONFIG, vocab_size=len(tok)),
        "tokenizer": tok.to_config(),
        "scheduler": dict(SCHEDULER_CONFIG),
    }


def build_components(config: dict, seed: int = 0) -> dict:
    """Random-init components from ``config``; the text encoder is seeded and frozen.

    Returns:
        ``{"unet", "text_encoder", "tokenizer", "scheduler"}`` ready for ``DigitsPipeline(**...)``.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"])).eval()
    text_encoder.requires_grad_(False)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**config["unet"])
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": WordTokenizer.from_config(config["tokenizer"]),
        "scheduler": DDIMScheduler(**config["scheduler"]),
    }


def save_checkpoint(out_dir: str | Path, unet, text_encoder, config: dict) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (fp32, contiguous) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return out


def load_components(ckpt_dir: str | Path) -> dict:
    """Components with the trained weights of the checkpoint in ``ckpt_dir``."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    comps = build_components(config)
    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    for name in ("unet", "text_encoder"):
        sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        comps[name].load_state_dict(sd, strict=True)
    comps["unet"].eval()
    comps["config"] = copy.deepcopy(config)
    return comps

"""Config of the embedded layouts model; building, saving and loading reuse the digits code.

Same Stable-Diffusion-shaped UNet as ``model=digits`` (cross-attention transformer blocks with
attn1 / attn2 / GEGLU at the two upper levels and in the mid block: 7 ``BasicTransformerBlock``
s), on a 32x32 pixel canvas, so the first attention level has 32x32 = 1024 tokens. The text
encoder is a small CLIP text model trained jointly with the UNet (the digits model keeps its
encoder frozen; here the prompt must bind each digit to a position, which a frozen random
encoder does not reliably encode).
"""

from __future__ import annotations

from pathlib import Path

from edm.digits.components import SCHEDULER_CONFIG, TEXT_DIM, UNET_PRESETS
from edm.digits.data import DIGIT_WORDS
from edm.digits.tokenizer import WordTokenizer
from edm.layouts.data import CANVAS, POSITIONS

WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_TOKENS = 32  # 4 objects x 6 words + 3 "and" + <bos>/<eos> = 29 tokens

TEXT_ENCODER_CONFIG = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": MAX_TOKENS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def default_tokenizer() -> WordTokenizer:
    """Vocabulary: every word a layout prompt can use (ids are stable)."""
    words = ["a", "an", "at", "the", "and", *DIGIT_WORDS, *" ".join(POSITIONS).split()]
    return WordTokenizer.from_texts([" ".join(words)], model_max_length=MAX_TOKENS)


def default_config(preset: str = "small") -> dict:
    """The full model config for a UNet preset of the digits model at the 32x32 canvas."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown layouts preset {preset!r}; allowed: {', '.join(UNET_PRESETS)}")
    unet = dict(UNET_PRESETS[preset], sample_size=CANVAS)
    tok = default_tokenizer()
    return {
        "model": "layouts",
        "preset": preset,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()},
        "text_encoder": dict(TEXT_ENCODER_CONFIG, vocab_size=len(tok)),
        "tokenizer": tok.to_config(),
        "scheduler": dict(SCHEDULER_CONFIG),
    }

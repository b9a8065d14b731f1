"""ImageReward (Xu et al., NeurIPS 2023) on current libraries, loading the official checkpoint.

The upstream ``image-reward`` package cannot be imported with transformers 5 / timm >= 1 /
setuptools >= 81, so this module re-creates its inference path with the same parameter names, so
the official ``ImageReward.pt`` loads key for key:

* ``blip.visual_encoder.*``: BLIP's ViT (ViT-L/16 at 224² in the release) — the layout of
  timm's ``VisionTransformer`` (pre-norm blocks, LayerNorm eps 1e-6, fused qkv), so timm builds it.
* ``blip.text_encoder.*``: BLIP's BERT ("med" config) whose every layer has self-attention, then
  cross-attention to the image tokens, then the FFN. Its embeddings have no token-type table and
  cross-attention keys/values read the ViT width. transformers' ``BertModel`` needs
  ``is_decoder=True`` (causal self-attention) for cross-attention and fixes key/value input to
  ``hidden_size``, so the encoder is written here (:class:`BlipTextEncoder`).
* ``mlp.layers.{0,2,4,6,7}``: the reward head, five Linear layers with no activation (dropouts,
  identity at inference, sit at indices 1, 3, 5).

Score = (head(text_encoder(prompt, image)[CLS]) - 0.16717...) / 1.03333..., prompt tokenised by
bert-base-uncased with ``[DEC]``/``[ENC]`` added, padded/truncated to 35 tokens, ``[CLS]`` kept.
Parity with the upstream package: ``experiments/image_reward_parity/``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Reward normalisation of the released model (ImageReward.py: self.mean / self.std).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LEN = 35  # ImageReward.score(): padding="max_length", truncation=True, max_length=35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_HEAD_DIM = 64  # BLIP ViT-B (12 heads x 64) and ViT-L (16 heads x 64)


class _Proj(nn.Module):
    """q/k/v of one attention (checkpoint names: ``.self.{query,key,value}``)."""

    def __init__(self, width: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)


class _Residual(nn.Module):
    """Linear + residual + post-LayerNorm (BERT's ``*.output``)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = _Proj(width, kv_width)
        self.output = _Residual(width, width, eps)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [B, N, C]; kv: [B, M, Ckv]; bias: additive mask broadcastable to [B, h, N, M]."""
        b, n, c = x.shape
        q, k, v = (
            self._heads(f(t))
            for f, t in ((self.self.query, x), (self.self.key, kv), (self.self.value, kv))
        )
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.output(ctx.transpose(1, 2).reshape(b, n, c), x)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, heads, L, C / heads]."""
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)


class _Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class _Layer(nn.Module):
    def __init__(self, width: int, enc_width: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.attention = _Attention(width, width, heads, eps)
        self.crossattention = _Attention(width, enc_width, heads, eps)
        self.intermediate = _Intermediate(width, ffn)
        self.output = _Residual(ffn, width, eps)

    def forward(
        self, h: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        h = self.attention(h, h, text_bias)
        h = self.crossattention(h, image, None)  # every image token is valid
        return self.output(F.gelu(self.intermediate.dense(h)), h)  # hidden_act "gelu" (erf)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, max_pos: int, pad_id: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_pos, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _Encoder(nn.Module):
    def __init__(self, layers: list[_Layer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BlipTextEncoder(nn.Module):
    """BLIP's BERT text encoder in "multimodal" mode (bidirectional, cross-attends to the image).

    Args:
        med_config: the ``med_config.json`` dict (BERT sizes; ``hidden_act`` must be ``gelu``).
        encoder_width: width of the image tokens (the ViT width; BLIP overrides the file's value).
    """

    def __init__(self, med_config: dict, encoder_width: int):
        super().__init__()
        c = med_config
        if c.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"med_config hidden_act={c['hidden_act']!r}; only 'gelu' is supported"
            )
        width, eps = c["hidden_size"], c["layer_norm_eps"]
        self.embeddings = _Embeddings(
            c["vocab_size"], width, c["max_position_embeddings"], c.get("pad_token_id", 0), eps
        )
        self.encoder = _Encoder(
            [
                _Layer(width, encoder_width, c["num_attention_heads"], c["intermediate_size"], eps)
                for _ in range(c["num_hidden_layers"])
            ]
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, L]; image: [B, M, encoder_width] -> hidden states [B, L, hidden]."""
        h = self.embeddings(ids)
        # BERT's extended mask: 0 for real tokens, -10000 for padding (what BLIP adds to scores).
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * -10000.0
        for layer in self.encoder.layer:
            h = layer(h, bias, image)
        return h


def build_vit(image_size: int, patch: int, width: int, depth: int, heads: int) -> nn.Module:
    """BLIP's ViT as timm's VisionTransformer (same parameter names); tokens after final norm."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=image_size,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


class _Blip(nn.Module):
    def __init__(self, visual_encoder: nn.Module, text_encoder: BlipTextEncoder):
        super().__init__()
        self.visual_encoder, self.text_encoder = visual_encoder, text_encoder


class _Head(nn.Module):
    """``mlp.layers``: Linear layers at indices 0, 2, 4, 6, 7; dropouts (identity here) between."""

    def __init__(self, dims: list[int]):
        super().__init__()
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 3:  # no dropout after the last two Linear layers
                mods.append(nn.Identity())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """ViT + cross-attending text encoder + reward head; build with :meth:`from_state_dict`."""

    def __init__(
        self, vit: nn.Module, text: BlipTextEncoder, head_dims: list[int], image_size: int
    ):
        super().__init__()
        self.blip = _Blip(vit, text)
        self.mlp = _Head(head_dims)
        self.image_size = image_size
        self.unused_keys: list[str] = []  # checkpoint keys inference does not need

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], med_config: dict, vit_heads: int | None = None
    ) -> ImageRewardModel:
        """Infer sizes from the checkpoint's shapes, build, and load it (strict on needed keys).

        Args:
            sd: the official ``ImageReward.pt`` state dict (``blip.*``, ``mlp.*``).
            med_config: ``med_config.json`` contents.
            vit_heads: ViT heads; default width // 64 (BLIP's ViT-B and ViT-L).
        """
        p = "blip.visual_encoder."
        width = sd[p + "cls_token"].shape[-1]
        patch = sd[p + "patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd[p + "pos_embed"].shape[1] - 1)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(p + r"blocks\.(\d+)\.", k)))
        vit = build_vit(
            grid * patch, patch, width, depth, vit_heads or max(1, width // BLIP_HEAD_DIM)
        )
        text = BlipTextEncoder(med_config, encoder_width=width)
        lin = sorted(
            int(k.split(".")[2]) for k in sd if re.fullmatch(r"mlp\.layers\.\d+\.weight", k)
        )
        head_dims = [sd[f"mlp.layers.{lin[0]}.weight"].shape[1]]
        head_dims += [sd[f"mlp.layers.{i}.weight"].shape[0] for i in lin]
        model = cls(vit, text, head_dims, grid * patch)
        needed = model.state_dict().keys()
        missing = [k for k in needed if k not in sd]
        if missing:
            raise KeyError(f"ImageReward checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
        # Extra keys (vision_proj, text_proj, position_ids) are unused at inference, as upstream.
        model.load_state_dict({k: sd[k] for k in needed}, strict=True)
        model.unused_keys = sorted(set(sd) - set(needed))
        return model.eval()

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] CLIP-normalised; ids, mask: [B, L] -> rewards [B]."""
        image = self.blip.visual_encoder.forward_features(pixels)  # [B, 1 + grid², width]
        h = self.blip.text_encoder(ids, mask, image)
        reward = self.mlp(h[:, 0, :].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def image_transform(size: int):
    """Upstream preprocessing on PIL images: bicubic resize of the short side, centre crop, RGB."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
        ToTensor,
    )

    return Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def blip_tokenizer(vocab_file: str | Path):
    """bert-base-uncased WordPiece from its ``vocab.txt`` plus BLIP's ``[DEC]``/``[ENC]``."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    tok = BertTokenizer(vocab=load_vocab(str(vocab_file)), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_med_config(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

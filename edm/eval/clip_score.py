"""CLIP score with open_clip, weights from the local cache only.

Convention (fixed; matches the 0.31-style numbers AT-EDM and OBS-Diff report):

    clip_score = mean over images of max(cos(E_img(x_i), E_txt(p_i)), 0)

reported **x1** (torchmetrics' ``CLIPScore`` reports 100x this). Images go through the pretrained
tag's own open_clip preprocessing (resize short side, centre crop, normalise); prompts through
open_clip's tokenizer (truncated to the 77-token context).

torchmetrics 1.9 ``CLIPScore`` is not used: it crashes on transformers 5
(Lightning-AI/torchmetrics#3407).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.base import ImageSet, read_image
from edm.eval.weights import cached_hf_file, fetch_hint_hf, require_file

log = logging.getLogger(__name__)


def pretrained_cfg(model: str, pretrained: str) -> dict:
    """open_clip's config of a (model, tag) pair (preprocessing, QuickGELU, hub location)."""
    import open_clip

    if model not in open_clip.list_models():
        raise ConfigError(
            "eval.clip_score.model",
            f"unknown open_clip model '{model}'.",
            [m for m in open_clip.list_models() if m.startswith("ViT")],
        )
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise ConfigError(
            "eval.clip_score.pretrained",
            f"unknown tag '{pretrained}' for {model}.",
            open_clip.list_pretrained_tags_by_model(model),
        )
    return cfg


def resolve_open_clip(model: str, pretrained: str) -> tuple[Path, dict]:
    """Local weights file and pretrained config of an open_clip (model, tag).

    Raises ``ConfigError`` for an unknown pair and ``MissingWeightsError`` (with the
    ``hf download`` command) when the weights are not in the hub cache.
    """
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = pretrained_cfg(model, pretrained)
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise MissingWeightsError(
            f"open_clip {model}/{pretrained} has no hub copy; download {cfg.get('url')} and set "
            "eval.clip_score.weights_path=/path/to/file."
        )
    repo, filename = hub.rstrip("/"), None
    if not hub.endswith("/"):  # 'org/repo/file.bin' form
        repo, filename = hub.rsplit("/", 1)
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    for name in names:
        if (path := cached_hf_file(repo, name)) is not None:
            return path, cfg
    raise MissingWeightsError(
        f"CLIP score: open_clip weights for {model}/{pretrained} ({repo}: {' or '.join(names)}) "
        f"are not in the local Hugging Face cache; edm never downloads at run time.\n"
        + fetch_hint_hf(repo, names[:1])
        + "\nOr set eval.clip_score.weights_path=/path/to/weights."
    )


def load_open_clip(model: str, pretrained: str, weights_path: str | None, device: torch.device):
    """(model, preprocess, tokenizer) built offline from the resolved weights file."""
    import open_clip

    if weights_path:
        cfg = pretrained_cfg(model, pretrained)
        path = require_file(weights_path, "CLIP score weights", "", "eval.clip_score.weights_path")
    else:
        path, cfg = resolve_open_clip(model, pretrained)
    net, _, preprocess = open_clip.create_model_and_transforms(
        model,
        pretrained=str(path),
        device=device,
        force_quick_gelu=bool(cfg.get("quick_gelu", False)),  # OpenAI weights use QuickGELU
        image_mean=cfg.get("mean"),
        image_std=cfg.get("std"),
        image_interpolation=cfg.get("interpolation"),
        image_resize_mode=cfg.get("resize_mode"),
    )
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


class CLIPScore:
    """Text-image alignment of each (prompt, image): max(cos, 0), averaged (x1 scale).

    Args:
        model: open_clip architecture, ``ViT-B-16`` (OBS-Diff) or ``ViT-g-14`` (AT-EDM).
        pretrained: open_clip tag, ``openai`` (OBS-Diff's ViT-B/16) or ``laion2b_s12b_b42k``
            (AT-EDM's "OpenCLIP ViT-g/14"; ``laion2b_s34b_b88k`` is the later checkpoint).
        weights_path: explicit local weights file instead of the hub cache.
        batch_size: images per forward pass.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        loader: callable returning ``(model, preprocess, tokenizer)`` with open_clip's interface
            (``encode_image``, ``encode_text``); replaces the weights lookup (tests).
    """

    name = "clip_score"

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        weights_path: str | None = None,
        batch_size: int = 32,
        device: str = "auto",
        loader: Callable[[], tuple[Any, Callable, Callable]] | None = None,
    ):
        self.model, self.pretrained, self.weights_path = model, pretrained, weights_path
        self.batch_size, self.device, self.loader = batch_size, device, loader
        self._parts: tuple[Any, Callable, Callable] | None = None

    def check(self) -> None:
        """Pre-flight: the weights of (model, pretrained) are local (no model is built)."""
        if self.loader is not None:
            return
        if self.weights_path:
            pretrained_cfg(self.model, self.pretrained)
            require_file(
                self.weights_path, "CLIP score weights", "", "eval.clip_score.weights_path"
            )
            return
        resolve_open_clip(self.model, self.pretrained)

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def parts(self) -> tuple[Any, Callable, Callable]:
        if self._parts is None:
            if self.loader is not None:
                self._parts = self.loader()
            else:
                self._parts = load_open_clip(
                    self.model, self.pretrained, self.weights_path, self._device()
                )
        return self._parts

    @torch.no_grad()
    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """max(cos, 0) per pair, float [B]."""
        net, preprocess, tokenizer = self.parts()
        dev = next(iter(net.parameters())).device
        pix = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(dev)
        img = F.normalize(net.encode_image(pix).float(), dim=-1)
        txt = F.normalize(net.encode_text(tokenizer(list(prompts)).to(dev)).float(), dim=-1)
        return (img * txt).sum(-1).clamp(min=0).cpu()

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        scores: list[float] = []
        paths, prompts = images.paths, images.prompts
        for s in range(0, len(paths), self.batch_size):
            pil = []
            for p in paths[s : s + self.batch_size]:
                with read_image(p) as im:  # DamagedImageError names a file that won't decode
                    pil.append(im.convert("RGB"))
            scores += self.score(prompts[s : s + self.batch_size], pil).tolist()
        mean = sum(scores) / max(len(scores), 1)
        log.info(
            "CLIP score <%s/%s> = %.4f over %d images",
            self.model,
            self.pretrained,
            mean,
            len(scores),
        )
        return {"clip_score": mean, "clip_score_per_image": scores}

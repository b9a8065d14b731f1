"""Evaluator protocol and the image set evaluators read from disk.

An evaluator is built by Hydra from a ``_target_`` node of the ``eval`` group. It must be cheap to
construct; heavy imports and weight loading happen in ``check()`` (pre-flight, run *before*
generation so missing weights fail in seconds) or lazily in ``evaluate()``.

``evaluate(images)`` returns a dict: float values are metrics (logged as ``eval/<key>``), list
values of length ``len(images)`` are per-image scores (shown in the W&B image table).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PromptItem:
    """One generation request. ``seed`` makes the same prompt get the same noise under every method."""

    index: int
    prompt: str
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> str:
        return json.dumps(
            {"index": self.index, "prompt": self.prompt, "seed": self.seed, "meta": self.meta}
        )


def image_path(images_dir: Path, index: int) -> Path:
    return Path(images_dir) / f"{index:06d}.png"


@dataclass
class ImageSet:
    """Generated images on disk (``images_dir/{index:06d}.png``) with their prompt items."""

    images_dir: Path
    items: list[PromptItem]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [image_path(self.images_dir, it.index) for it in self.items]

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    def missing(self) -> list[int]:
        return [it.index for it in self.items if not image_path(self.images_dir, it.index).exists()]

    def load(self, i: int, mode: str | None = None) -> np.ndarray:
        """Image ``i`` (position in ``items``) as uint8 HxWxC (C=3 unless ``mode='L'``)."""
        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert(mode or "RGB"))

    def iter_batches(
        self, batch_size: int = 32, mode: str | None = None
    ) -> Iterator[tuple[torch.Tensor, list[PromptItem]]]:
        """Yield ``(uint8 [B, C, H, W], items)`` batches in item order, streamed from disk."""
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start : start + batch_size]
            arrs = [self.load(start + j, mode) for j in range(len(chunk))]
            arrs = [a[..., None] if a.ndim == 2 else a for a in arrs]
            yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous(), chunk


class Evaluator(Protocol):
    name: str

    def check(self) -> None:
        """Pre-flight: raise ``edm.errors.MissingWeightsError`` if weights/references are absent."""

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]: ...

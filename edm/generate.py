"""Batched, resumable, shardable image generation with per-prompt seeds.

* Each item gets a fresh ``torch.Generator`` seeded with ``item.seed``, so the same prompt gets the
  same initial noise under every method (a reused generator silently breaks A/B comparisons).
* Images are written as ``images_dir/{index:06d}.png`` by write-then-rename; a rerun skips every
  index already on disk, so a killed or requeued job resumes without regenerating or corrupting.
* The first batch of a process is a warm-up and is not timed (first calls are slow).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from edm.eval.base import PromptItem, image_path
from edm.io import write_png

log = logging.getLogger(__name__)


@dataclass
class GenStats:
    generated: int = 0
    skipped: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0
    per_batch: list[float] = field(default_factory=list)

    @property
    def sec_per_image(self) -> float | None:
        return self.timed_seconds / self.timed_images if self.timed_images else None


def to_pil(img: torch.Tensor) -> Image.Image:
    """[C, H, W] float in [0, 1] -> PIL (L for one channel, RGB for three)."""
    arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_pipe(pipe, items: list[PromptItem], gen: dict, device: torch.device) -> torch.Tensor:
    """One pipeline call for ``items``; returns float images [B, C, H, W] in [0, 1]."""
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(int(it.seed)) for it in items]
    kwargs = dict(
        prompt=[it.prompt for it in items],
        num_inference_steps=int(gen["num_inference_steps"]),
        guidance_scale=float(gen["guidance_scale"]),
        height=int(gen["height"]),
        width=int(gen["width"]),
        generator=generators,
        output_type="pt",
    )
    if gen.get("negative_prompt"):
        kwargs["negative_prompt"] = [gen["negative_prompt"]] * len(items)
    with torch.inference_mode():
        out = pipe(**kwargs)
    return out.images


def generate(
    pipe,
    items: list[PromptItem],
    gen: dict,
    images_dir: Path,
    device: torch.device,
    warmup: bool = True,
    progress: bool = True,
) -> GenStats:
    """Generate every item not yet on disk. Returns counts and timing of the timed batches."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not image_path(images_dir, it.index).exists()]
    stats = GenStats(skipped=len(items) - len(todo))
    if stats.skipped:
        log.info("Resuming: %d of %d images already in %s", stats.skipped, len(items), images_dir)
    bs = int(gen["batch_size"])
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    for b, batch in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        images = call_pipe(pipe, batch, gen, device)
        _sync(device)
        dt = time.perf_counter() - t0
        if not (warmup and b == 0):
            stats.timed_images += len(batch)
            stats.timed_seconds += dt
            stats.per_batch.append(dt / len(batch))
        for it, img in zip(batch, images):
            write_png(image_path(images_dir, it.index), to_pil(img))
        stats.generated += len(batch)
        bar.update(len(batch))
    bar.close()
    return stats


def time_batches(pipe, items: list[PromptItem], gen: dict, device: torch.device,
                 n_batches: int) -> GenStats:
    """Latency without writing images (used when every image was already on disk)."""
    stats = GenStats()
    bs = int(gen["batch_size"])
    batch = items[:bs]
    if not batch or n_batches <= 0:
        return stats
    call_pipe(pipe, batch, gen, device)  # warm-up
    for _ in range(n_batches):
        _sync(device)
        t0 = time.perf_counter()
        call_pipe(pipe, batch, gen, device)
        _sync(device)
        dt = time.perf_counter() - t0
        stats.timed_images += len(batch)
        stats.timed_seconds += dt
        stats.per_batch.append(dt / len(batch))
    return stats

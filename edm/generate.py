"""Batched, resumable, shardable image generation with per-prompt seeds.

* Each item gets a fresh ``torch.Generator`` seeded with ``item.seed``, so the same prompt gets the
  same initial noise under every method (a reused generator silently breaks A/B comparisons).
* Images are written as ``images_dir/{index:06d}.png`` by write-then-rename; a rerun skips every
  index already on disk *and valid*, so a killed or requeued job resumes without regenerating.
* Resume checks each existing file (:func:`edm.data.images.image_problem`: fully decodes, has
  ``gen.width`` x ``gen.height`` and the pipeline's mode) and regenerates damaged ones (a partial
  rsync, a bad disk) from their own seeds; temp files of killed writers are removed first.
* Batches are always the fixed slices ``items[k*bs:(k+1)*bs]`` of an uninterrupted run; a slice
  with anything to (re)generate is run whole and only its missing/damaged images are written.
  The images are then byte-identical to an uninterrupted run's: the per-item generators make the
  noise batch-independent, but the UNet's float kernels are not (the digits model on CPU gives
  different uint8 pixels in ~3-5% of images when the batch *size* changes; the batch's order and
  companions do not matter there, the size does; GPU kernels also choose by shape).
* The first batch of a process is a warm-up and is not timed (first calls are slow).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from edm.data.images import MISSING, PromptItem, image_path, image_problem, probe_images
from edm.errors import ConfigError
from edm.io import remove_stale_temps, write_png

log = logging.getLogger(__name__)


@dataclass
class GenStats:
    """What :func:`generate` did.

    ``generated``: images written (new + repaired). ``skipped``: valid images already on disk.
    ``repaired``: damaged files regenerated (``repaired_indices``), a subset of ``generated``.
    ``recomputed``: valid images computed again only to keep a batch as it was in an
    uninterrupted run (not written). ``stale_temps``: temp files of killed writers removed.
    ``timed_images``/``timed_seconds``: over the batches after warm-up, all images computed.
    """

    generated: int = 0
    skipped: int = 0
    repaired: int = 0
    repaired_indices: list[int] = field(default_factory=list)
    recomputed: int = 0
    stale_temps: int = 0
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
    kwargs.update(gen.get("call_kwargs") or {})  # e.g. FLUX's max_sequence_length
    with torch.inference_mode():
        out = pipe(**kwargs)
    return out.images


def pipeline_mode(pipe) -> str | None:
    """PIL mode of the images ``pipe`` makes, from its config: ``"L"`` for one output channel
    (the digits model: pixel-space UNet with ``out_channels=1``), ``"RGB"`` for three (a VAE
    decoder's ``out_channels``); ``None`` when the pipeline does not say."""
    net = getattr(pipe, "vae", None)
    if net is None:
        net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    channels = getattr(getattr(net, "config", None), "out_channels", None)
    return {1: "L", 3: "RGB"}.get(channels)


def _expected_mode(pipe, probes, size) -> str | None:
    """The mode every image must have: the pipeline's (:func:`pipeline_mode`), else the mode of
    most existing files of the right size, else ``None`` (nothing to compare against yet). The
    first fresh batch is checked against it in :func:`generate`."""
    mode = pipeline_mode(pipe)
    if mode is not None:
        return mode
    modes = Counter(m for problem, got_size, m in probes if problem is None and got_size == size)
    if not modes:
        return None
    mode, n = modes.most_common(1)[0]
    if 2 * n <= sum(modes.values()):
        log.warning("Existing images have mixed modes %s; taking %s as the expected one",
                    dict(modes), mode)
    return mode


def _check_fresh(img: Image.Image, size: tuple[int, int], mode: str | None, images_dir: Path) -> None:
    """A freshly generated image must be what the resume check accepts, or every resume would
    regenerate (or wrongly keep) the images on disk."""
    if img.size != size:
        raise ConfigError("gen.height", f"the pipeline made {img.size[0]}x{img.size[1]} images for "
                          f"<gen.width={size[0]}> <gen.height={size[1]}>; use a size it keeps.")
    if mode is not None and img.mode != mode:
        raise ConfigError("gen.images_dir", f"the pipeline makes mode-{img.mode} images but "
                          f"{images_dir} holds mode-{mode} ones: is it shared with another model?")


def generate(
    pipe,
    items: list[PromptItem],
    gen: dict,
    images_dir: Path,
    device: torch.device,
    warmup: bool = True,
    progress: bool = True,
) -> GenStats:
    """Generate every item not validly on disk. Returns counts and timing of the timed batches.

    Cost of the resume check: one full decode per existing file, on a few threads (about 4 ms
    per 512x512 PNG and core, so ~40 s of CPU for 10k images; negligible for 16x16 digits).
    """
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = {it.index: image_path(images_dir, it.index) for it in items}
    # Only this call's targets: another shard writing into the same folder keeps its temp files.
    stale = remove_stale_temps(images_dir, {p.name for p in paths.values()})
    if stale:
        log.info("Removed %d temp files of killed writers in %s", len(stale), images_dir)
    size = (int(gen["width"]), int(gen["height"]))
    probes = probe_images(paths.values())  # decodes in parallel; image_problem reuses the result
    mode = _expected_mode(pipe, probes, size)
    problems = {it.index: image_problem(paths[it.index], size, mode) for it in items}
    todo = {i for i, problem in problems.items() if problem is not None}
    damaged = {i: problem for i, problem in problems.items() if problem not in (None, MISSING)}
    stats = GenStats(skipped=len(items) - len(todo), repaired=len(damaged),
                     repaired_indices=sorted(damaged), stale_temps=len(stale))
    if stats.skipped:
        log.info("Resuming: %d of %d images already in %s", stats.skipped, len(items), images_dir)
    if damaged:
        shown = "; ".join(f"{i:06d}: {damaged[i]}" for i in stats.repaired_indices[:20])
        more = f"; and {len(damaged) - 20} more" if len(damaged) > 20 else ""
        log.warning("Regenerating %d damaged images in %s from their seeds: %s%s",
                    len(damaged), images_dir, shown, more)
    bs = int(gen["batch_size"])
    grid = [items[i : i + bs] for i in range(0, len(items), bs)]  # as an uninterrupted run
    batches = [chunk for chunk in grid if any(it.index in todo for it in chunk)]
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
        fresh = [(it, to_pil(img)) for it, img in zip(batch, images) if it.index in todo]
        if b == 0:
            _check_fresh(fresh[0][1], size, mode, images_dir)
        for it, pil in fresh:
            write_png(paths[it.index], pil)
        stats.generated += len(fresh)
        stats.recomputed += len(batch) - len(fresh)
        bar.update(len(fresh))
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

"""Dense reference images for paired fidelity (``eval=paired``), made once and shared.

A method's images are compared with the *dense* model's image for the same prompt, seed and
generation protocol. Those reference images depend only on the model, the prompt set and the
protocol, not on the method, so they live outside the run directory, in
``<root>/<key>/{index:06d}.png`` (``root`` = ``${paths.cache_dir}/dense_refs`` by default),
where ``key`` hashes everything that decides their pixels (:func:`reference_spec`). Every run
of a sweep, and every SLURM job of it, finds the same folder again.

They are generated with the run's own pipeline *before* its method is applied (a weight method
cannot be undone, a runtime method changes the forward) by :func:`edm.generate.generate`: the
same batching, per-prompt generators and atomic writes as the run's images, so generation is
resumable, shardable (each shard makes its own items' references) and a dense run scored
against its references compares identical files. Concurrent jobs of one key take a file lock, so
the references are made once while the others wait, then skip them as valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from edm.data.images import ImageSet, PromptItem
from edm.io import write_json

log = logging.getLogger(__name__)

# gen.* keys that change a dense image's pixels (shard, images_dir, warmup... do not; batch_size
# does: the float kernels differ by batch shape, see edm.generate).
_GEN_KEYS = ("num_inference_steps", "guidance_scale", "height", "width", "negative_prompt",
             "call_kwargs", "batch_size")


def reference_spec(cfg: DictConfig, items: list[PromptItem], device: torch.device,
                   gen: dict | None = None) -> dict:
    """Everything that decides the dense images' pixels, as a JSON-able dict. ``gen``: the
    dense generation settings (``Method.reference_gen``; default the run's ``cfg.gen``)."""
    import diffusers

    items_hash = hashlib.sha256(
        "".join(f"{it.index}\t{it.seed}\t{it.prompt}\n" for it in items).encode()).hexdigest()
    gen = gen if gen is not None else OmegaConf.to_container(cfg.gen, resolve=True)
    return {
        "model": cfg.model.name,
        "loader": OmegaConf.to_container(cfg.model.loader, resolve=True),  # not pruned_from
        "dtype": str(cfg.model.dtype),
        "gen": {k: gen.get(k) for k in _GEN_KEYS},
        "items": {"count": len(items), "sha256": items_hash},
        # pixels differ between CPU and GPU kernels and between library versions
        "device": device.type,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def reference_key(spec: dict) -> str:
    """Folder name of a spec: model name plus a hash (readable and collision-free)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return f"{spec['model']}-{digest[:16]}"


def reference_dir(cfg: DictConfig, items: list[PromptItem], device: torch.device,
                  root: str | Path, gen: dict | None = None) -> tuple[Path, dict]:
    spec = reference_spec(cfg, items, device, gen)
    return Path(root) / reference_key(spec), spec


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released on close, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_references(pipe, items: list[PromptItem], gen: dict[str, Any], folder: Path,
                    spec: dict, device: torch.device, progress: bool = False) -> int:
    """Generate the dense images of ``items`` missing (or damaged) in ``folder``; returns how
    many were written. ``pipe`` must be dense: call before the method is applied."""
    from edm.generate import generate

    with _locked(folder):
        write_json(folder / "reference.json", spec)
        todo = ImageSet(folder, items, size=(gen["width"], gen["height"])).missing()
        if not todo:
            return 0
        log.info("Dense references: %d of %d images to make in %s", len(todo), len(items), folder)
        stats = generate(pipe, items, gen, folder, device, warmup=False, progress=progress)
        return stats.generated

"""Experiment tracking. ``metrics.json`` is always written by the runner; W&B is optional.

``mode: auto`` follows ``WANDB_MODE`` when set, else logs online only when an API key is
configured (``WANDB_API_KEY`` or a netrc entry), otherwise offline into the run directory; sync later with
``wandb sync <output_dir>/wandb/offline-run-*`` from a machine with internet.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """Thin W&B wrapper: init with the resolved config, log scalars, an image table, finish.

    Args:
        project, entity, group, name, job_type, tags: the usual ``wandb.init`` fields.
        mode: ``online`` | ``offline`` | ``disabled`` | ``auto`` (see module docstring).
        image_table: how many images (lowest prompt indices, identical for every method) go into
            the per-run table.
    """

    def __init__(self, project: str = "edm", entity: str | None = None, group: str | None = None,
                 name: str | None = None, job_type: str | None = None, tags=None,
                 mode: str = "auto", image_table: int = 16):
        if mode not in ("online", "offline", "disabled", "auto"):
            from edm.errors import ConfigError

            raise ConfigError("logger.mode", f"unknown mode {mode!r}.",
                              ["online", "offline", "disabled", "auto"])
        self.kw = dict(project=project, entity=entity, group=group, name=name,
                       job_type=job_type, tags=list(tags or []))
        if mode == "auto":  # an explicit WANDB_MODE (e.g. offline on cluster nodes) wins
            env = os.environ.get("WANDB_MODE")
            mode = env if env in ("online", "offline", "disabled") else (
                "online" if _has_api_key() else "offline")
        self.mode = mode
        self.image_table = image_table
        self.run = None

    def start(self, config: dict, output_dir: Path, job_type: str | None = None) -> None:
        import wandb

        kw = dict(self.kw)
        kw["job_type"] = kw["job_type"] or job_type
        self.run = wandb.init(config=config, dir=str(output_dir), mode=self.mode,
                              reinit="finish_previous", **kw)
        log.info("W&B run %s (mode=%s) <logger.mode>", self.run.id, self.mode)

    def log(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics)
            for k, v in metrics.items():
                self.run.summary[k] = v

    def log_images(self, images_dir: Path, items: list, per_image: dict[str, list[Any]]) -> None:
        if self.run is None or self.image_table <= 0:
            return
        import wandb

        from edm.data.images import image_path

        rows = sorted(items, key=lambda it: it.index)[: self.image_table]
        pos = {it.index: i for i, it in enumerate(items)}
        cols = ["index", "prompt", "image", *per_image]
        table = wandb.Table(columns=cols)
        for it in rows:
            p = image_path(images_dir, it.index)
            if not p.exists():
                continue
            scores = [per_image[k][pos[it.index]] for k in per_image]
            table.add_data(it.index, it.prompt, wandb.Image(str(p)), *scores)
        self.run.log({"images": table})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

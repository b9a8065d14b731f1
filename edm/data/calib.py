"""Calibration prompt sets for weight-pruning methods (config group ``calib``).

A calibration set is an object with ``load() -> list[PromptItem]`` and ``check()`` (pre-flight,
raises before any model is loaded). It may also carry calibration *settings* as attributes
(``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``batch_size``, ``seed``);
``edm.methods.weight.calibrate.resolve_settings`` reads them after the method's own overrides.

``CaptionsFile`` reads the captions the OBS-Diff paper calibrates on: Conceptual Captions (GCC3M)
``Train_GCC-training.tsv`` or MS-COCO ``captions_train2014.json``. Like the official code it takes
the *first* N captions in file order, not a random sample, so runs are comparable.
Nothing is downloaded: the file must already be on disk.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from pathlib import Path

from edm.data.images import PromptItem
from edm.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("gcc3m_tsv", "coco_json")
_SOURCES = {
    "gcc3m_tsv": "Conceptual Captions Train_GCC-training.tsv",
    "coco_json": "COCO annotations/captions_train2014.json",
}


class CaptionsFile:
    """First ``num_prompts`` captions of a captions file.

    Args:
        path: the file. GCC3M: ``Train_GCC-training.tsv`` (caption<TAB>url, no header).
            COCO: ``annotations/captions_train2014.json`` (``annotations[*].caption``).
        format: ``gcc3m_tsv`` or ``coco_json``.
        num_prompts: how many captions (paper: 100; quality plateaus there, paper Fig. 3).
        num_inference_steps, guidance_scale, height, width, batch_size, seed: calibration
            trajectory settings (paper: 25, 7.0, 512, 512, 4, 24432); ``None`` leaves them to
            the run's generation settings.
        name: label used in logs and reports.
        scheduler: sampler of the calibration trajectories only (a diffusers scheduler class,
            e.g. ``FlowMatchEulerDiscreteScheduler``); ``None`` = the loaded pipeline's. OBS-Diff
            Table 13 calibrates with Euler / PNDM and evaluates under other samplers.
    """

    def __init__(
        self,
        path: str,
        format: str = "gcc3m_tsv",
        num_prompts: int = 100,
        num_inference_steps: int | None = 25,
        guidance_scale: float | None = 7.0,
        height: int | None = 512,
        width: int | None = 512,
        batch_size: int | None = 4,
        seed: int | None = 24432,
        name: str = "captions",
        scheduler: str | None = None,
    ):
        if format not in FORMATS:
            raise ConfigError("calib.format", f"unknown captions format {format!r}.", FORMATS)
        if int(num_prompts) < 1:
            raise ConfigError("calib.num_prompts", f"must be >= 1, got {num_prompts}.")
        self.path = Path(path)
        self.format = format
        self.num_prompts = int(num_prompts)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.height, self.width = height, width
        self.batch_size = batch_size
        self.seed = seed
        self.name = name
        # calibration-only sampler (diffusers class name; None = the loaded pipeline's), checked
        # with the method's calibration settings (edm.methods.weight.calibrate)
        self.scheduler = scheduler

    def check(self) -> None:
        """Pre-flight: the captions file must exist locally (we never download)."""
        if not self.path.is_file():
            raise ConfigError(
                "calib.path",
                f"calibration captions file {str(self.path)!r} not found. Download it once "
                f"({_SOURCES[self.format]}) and point calib.path at it, or use calib=digits "
                "for the embedded model.",
            )

    def _captions(self):
        if self.format == "gcc3m_tsv":
            with self.path.open(newline="", encoding="utf-8") as f:
                for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                    if row and row[0].strip() and row[0].strip().lower() != "caption":
                        yield row[0].strip()
        else:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for ann in data.get("annotations", []):
                text = str(ann.get("caption", "")).strip()
                if text:
                    yield text

    def load(self) -> list[PromptItem]:
        """``PromptItem(index=i, prompt=caption_i, seed=seed + i)`` for the first N captions."""
        self.check()
        captions = list(itertools.islice(self._captions(), self.num_prompts))
        if len(captions) < self.num_prompts:
            log.warning(
                "<calib.path=%s> has only %d captions (< num_prompts=%d)",
                self.path,
                len(captions),
                self.num_prompts,
            )
        base = int(self.seed or 0)
        return [
            PromptItem(index=i, prompt=c, seed=base + i, meta={"source": self.name})
            for i, c in enumerate(captions)
        ]

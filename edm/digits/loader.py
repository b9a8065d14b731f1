"""``model.loader`` for the embedded digits model (``conf/model/digits.yaml``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edm.digits.components import CONFIG_NAME, WEIGHTS_DIR, WEIGHTS_NAME
from edm.errors import ConfigError, MissingWeightsError
from edm.validate import to_dtype

log = logging.getLogger(__name__)


class DigitsLoader:
    """Loads :class:`~edm.digits.pipeline.DigitsPipeline` from a checkpoint folder.

    Args:
        checkpoint: folder with ``config.json`` + ``model.safetensors`` (written by
            ``python -m edm.digits.train --out DIR``); ``None`` = the checkpoint shipped inside
            the package (``edm/digits/weights``).
    """

    default_dir = WEIGHTS_DIR  # subclasses for other embedded models change these two
    train_module = "edm.digits.train"

    def __init__(self, checkpoint: str | None = None):
        self.checkpoint = Path(checkpoint) if checkpoint else self.default_dir

    def check(self) -> Path:
        """Pre-flight: the checkpoint files exist (nothing is ever downloaded)."""
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (self.checkpoint / n).is_file()]
        if missing:
            raise MissingWeightsError(
                f"<model.loader.checkpoint> {self.checkpoint} lacks {', '.join(missing)}; "
                f"re-create it with `python -m {self.train_module} --out {self.checkpoint}`"
            )
        return self.checkpoint

    def load(self, family: str = "digits", dtype: str | torch.dtype = "fp32",
             device: str | torch.device = "cpu"):
        """The pipeline on ``device`` in ``dtype`` with ``pipe.edm_family == "digits"``."""
        from edm.digits.components import load_components
        from edm.digits.pipeline import DigitsPipeline

        if family != "digits":
            raise ConfigError("model.family", f"DigitsLoader loads family 'digits', not {family!r}.",
                              ["digits"])
        dtype = to_dtype(dtype)
        comps = load_components(self.check())
        config = comps.pop("config")
        for name in ("unet", "text_encoder"):
            comps[name].to(device)
            if dtype != torch.float32:  # the checkpoint is fp32; casting it to fp32 only warns
                comps[name].to(dtype)
        pipe = DigitsPipeline(**comps, mask_padding=config.get("pipeline", {}).get("mask_padding", False))
        pipe.set_progress_bar_config(disable=True)  # the runner shows its own progress
        log.info("Loaded %s from %s", type(self).__name__.removesuffix("Loader"), self.checkpoint)
        return pipe

    def train_data(self) -> tuple[torch.Tensor, list[str]]:
        """Training split for methods that fine-tune (Diff-Pruning): images in [0, 1] and prompts."""
        from edm.digits.data import TRAIN_TEMPLATES, digit_images, digit_prompt

        images, labels = digit_images("train")
        prompts = [digit_prompt(int(y), TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)])
                   for i, y in enumerate(labels)]
        return images, prompts

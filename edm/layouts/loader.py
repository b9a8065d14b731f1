"""``model.loader`` for the embedded layouts model (``conf/model/layouts.yaml``).

The layouts checkpoint has the digits checkpoint's format and runs in ``DigitsPipeline``
(family ``digits``), so only the default folder, the re-training hint and the training data for
fine-tuning methods (Diff-Pruning) differ from :class:`~edm.digits.loader.DigitsLoader`.
"""

from __future__ import annotations

import json

import torch

from edm.digits.components import CONFIG_NAME
from edm.digits.loader import DigitsLoader
from edm.layouts.components import WEIGHTS_DIR


class LayoutsLoader(DigitsLoader):
    """Loads the layouts checkpoint (``None`` = ``edm/layouts/weights``)."""

    default_dir = WEIGHTS_DIR
    train_module = "edm.layouts.train"

    def train_data(self, scenes: int = 2000, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        """Scenes of the train split in [0, 1] and their prompts (seeded: the same every call),
        drawn as this checkpoint was trained: ``copies`` and ``background`` of the recipe in its
        ``config.json`` (a checkpoint trained on copies is fine-tuned on copies)."""
        from edm.layouts.data import layout_prompt, random_layouts, render, repeat_digits

        recipe = json.loads((self.check() / CONFIG_NAME).read_text()).get("train", {})
        copies, background = float(recipe.get("copies", 0.0)), recipe.get("background", "empty")
        g = torch.Generator().manual_seed(seed)
        layouts = random_layouts(scenes, g)
        if copies:  # as edm.layouts.train.batch: no extra draws otherwise
            layouts = repeat_digits(layouts, g, copies)
        images = render(layouts, g, "train", background, copies=copies > 0)
        return images, [layout_prompt(lay.tolist()) for lay in layouts]

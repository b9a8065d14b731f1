"""``model.loader`` for the embedded layouts model (``conf/model/layouts.yaml``).

The layouts checkpoint has the digits checkpoint's format and runs in ``DigitsPipeline``
(family ``digits``), so only the default folder, the re-training hint and the training data for
fine-tuning methods (Diff-Pruning) differ from :class:`~edm.digits.loader.DigitsLoader`.
"""

from __future__ import annotations

import torch

from edm.digits.loader import DigitsLoader
from edm.layouts.components import WEIGHTS_DIR


class LayoutsLoader(DigitsLoader):
    """Loads the layouts checkpoint (``None`` = ``edm/layouts/weights``)."""

    default_dir = WEIGHTS_DIR
    train_module = "edm.layouts.train"

    def train_data(self, scenes: int = 2000, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        """Scenes of the train split in [0, 1] and their prompts (seeded: the same every call)."""
        from edm.layouts.data import layout_prompt, random_layouts, render

        g = torch.Generator().manual_seed(seed)
        layouts = random_layouts(scenes, g)
        return render(layouts, g, "train"), [layout_prompt(lay.tolist()) for lay in layouts]

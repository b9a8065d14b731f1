"""Prompt sets for the embedded layouts model (``data=layouts``, ``calib=layouts``).

Item ``i`` has ``1 + (offset + i) % 4`` objects (any 4 consecutive items cover 1-4 objects
once), digits and cells drawn from a generator seeded with ``layout_seed + offset + i``, so an
item's layout depends only on its position. The layout is stored in ``meta["layout"]`` for
``eval=layouts``. Deterministic. ``repeat > 0`` (prompts for a model trained with
``--copies``): with that probability an item's digits are all its first digit, drawn after the
layout from the same generator, so ``repeat=0`` items are unchanged.
"""

from __future__ import annotations

import torch

from edm.data.images import PromptItem
from edm.errors import ConfigError


class LayoutPrompts:
    """Prompts such as ``"a three at the top left and a seven at the bottom right"``.

    Args:
        num_prompts: how many items (200 = 50 per object count).
        offset: start position; calibration sets use another offset than evaluation sets.
        layout_seed: base seed of the layouts (not of the sampling noise).
        repeat: probability that all of an item's digits are one class (the copies model's
            scenes; 0 = independent digits).
        num_inference_steps, guidance_scale, height, width, batch_size, seed: calibration
            trajectory settings read by weight methods; ``None`` leaves them to the run.
        name: label used in logs and reports.
    """

    def __init__(self, num_prompts: int = 200, offset: int = 0, layout_seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, name: str = "layouts",
                 repeat: float = 0.0):
        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise ConfigError("data.num_prompts", f"must be a positive integer, got {num_prompts!r}.")
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError("data.offset", f"must be a non-negative integer, got {offset!r}.")
        if not 0.0 <= float(repeat) <= 1.0:
            raise ConfigError("data.repeat", f"must be a probability in [0, 1], got {repeat!r}.")
        self.num_prompts, self.offset, self.layout_seed = num_prompts, offset, int(layout_seed)
        self.repeat = float(repeat)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.height, self.width, self.batch_size, self.seed = height, width, batch_size, seed
        self.name = name

    def check(self) -> None:
        """Nothing to check: the prompts are generated, not read."""

    def load(self) -> list[PromptItem]:
        from edm.layouts.data import layout_prompt, random_layouts, repeat_digits

        items = []
        for i in range(self.num_prompts):
            j = self.offset + i
            g = torch.Generator().manual_seed(self.layout_seed + j)
            layout = random_layouts(1, g, counts=torch.tensor([1 + j % 4]))
            if self.repeat:
                layout = repeat_digits(layout, g, self.repeat)
            layout = layout[0].tolist()
            seed = 0 if self.seed is None else int(self.seed) + i
            items.append(PromptItem(index=i, prompt=layout_prompt(layout), seed=seed,
                                    meta={"layout": layout, "source": self.name}))
        return items

    def __len__(self) -> int:
        return self.num_prompts

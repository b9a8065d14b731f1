"""Prompt sets for the embedded digits model (``data=digits``, ``calib=digits``).

Item ``i`` asks for digit ``(offset + i) % 10``, so any 10 consecutive items cover every digit
once (balanced), with template ``templates[((offset + i) // 10) % len(templates)]``. The digit is
stored in ``meta["label"]`` for ``eval=digits``. Deterministic: no randomness at all.
"""

from __future__ import annotations

from edm.data.images import PromptItem
from edm.errors import ConfigError


class DigitPrompts:
    """Balanced digit prompts such as ``"a handwritten digit seven"``.

    Args:
        num_prompts: how many items (100 = 10 per digit, the size the README reports).
        offset: start position in the (label, template) sequence. Calibration sets use a
            different offset than evaluation sets, so different templates/seeds are used.
        templates: ``str.format`` templates with ``{word}`` ("seven") and/or ``{digit}`` ("7");
            ``None`` = the canonical evaluation template only.
        num_inference_steps, guidance_scale, height, width, batch_size, seed: calibration
            trajectory settings read by weight methods (``calib=digits``); ``None`` leaves them
            to the run's generation settings.
        name: label used in logs and reports.
    """

    def __init__(
        self,
        num_prompts: int = 100,
        offset: int = 0,
        templates: list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        name: str = "digits",
    ):
        from edm.digits.data import CANONICAL_TEMPLATE, digit_prompt

        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise ConfigError("data.num_prompts", f"must be a positive integer, got {num_prompts!r}.")
        if not isinstance(offset, int) or offset < 0:
            raise ConfigError("data.offset", f"must be a non-negative integer, got {offset!r}.")
        templates = list(templates) if templates else [CANONICAL_TEMPLATE]
        for t in templates:
            try:
                digit_prompt(0, t)
            except (KeyError, IndexError) as e:
                raise ConfigError(
                    "data.templates", f"template {t!r} uses an unknown field {e}.", ["{word}", "{digit}"]
                ) from None
        self.num_prompts, self.offset, self.templates = num_prompts, offset, templates
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.height, self.width, self.batch_size, self.seed = height, width, batch_size, seed
        self.name = name

    def check(self) -> None:
        """Nothing to check: the prompts are generated, not read."""

    def load(self) -> list[PromptItem]:
        from edm.digits.data import digit_prompt

        items = []
        for i in range(self.num_prompts):
            j = self.offset + i
            label = j % 10
            template = self.templates[(j // 10) % len(self.templates)]
            seed = 0 if self.seed is None else int(self.seed) + i
            items.append(
                PromptItem(index=i, prompt=digit_prompt(label, template), seed=seed,
                           meta={"label": label, "source": self.name})
            )
        return items

    def __len__(self) -> int:
        return self.num_prompts

"""Evaluator protocol.

An evaluator is built by Hydra from a ``_target_`` node of the ``eval`` group. It must be cheap to
construct; heavy imports and weight loading happen in ``check()`` (pre-flight, run *before*
generation so missing weights fail in seconds) or lazily in ``evaluate()``.

``evaluate(images)`` returns a dict: float values are metrics (logged as ``eval/<key>``), list
values of length ``len(images)`` are per-image scores (shown in the W&B image table). Images are
read through :class:`edm.data.images.ImageSet` (re-exported here for evaluator modules).
"""

from __future__ import annotations

from typing import Protocol

from edm.data.images import (  # noqa: F401 - the names evaluators and their tests use
    MISSING,
    ImageSet,
    PromptItem,
    image_path,
    image_problem,
    read_image,
)


class Evaluator(Protocol):
    name: str

    def check(self) -> None:
        """Pre-flight: raise ``edm.errors.MissingWeightsError`` if weights/references are absent."""

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]: ...

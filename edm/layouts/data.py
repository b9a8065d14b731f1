"""The layouts data: one to four digits at named positions on an empty 32x32 canvas.

A *layout* is a tuple of four cell contents in the order of ``POSITIONS`` (top left, top right,
bottom left, bottom right): a digit 0-9, or ``EMPTY``. A scene renders every digit of the
layout as a 12x12 scikit-learn digit (the 8x8 originals, bilinear) at a random offset of
0-``JITTER`` pixels inside its 16x16 cell; everything else is background (0). So most of the
canvas is flat background and the content is local: the structure token pruning relies on
(AT-EDM's premise), which the 16x16 digits model lacks.

Digits come from :func:`edm.digits.data.digit_images`, so the train / held-out split is the
digits model's: the diffusion model and the cell classifier train on scenes of train digits,
the evaluator's reference scenes use held-out digits only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from edm.digits.data import DIGIT_WORDS, quantize

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
EMPTY = -1
CANVAS = 32
CELL = 16
DIGIT_SIZE = 12
JITTER = CELL - DIGIT_SIZE  # offsets 0..4 inside the cell
NUM_CLASSES = 11  # the cell classifier: digits 0-9 and 10 = empty
EMPTY_CLASS = 10

__all__ = [
    "CANVAS",
    "CELL",
    "EMPTY",
    "POSITIONS",
    "cell_crops",
    "cell_digits",
    "layout_prompt",
    "quantize",
    "random_layouts",
    "render",
    "repeat_digits",
]


def _article(word: str) -> str:
    return "an" if word == "eight" else "a"  # by sound: "an eight", "a one"


def layout_prompt(layout) -> str:
    """``(3, -1, -1, 7)`` -> ``"a three at the top left and a seven at the bottom right"``.

    Objects are named in the fixed cell order of ``POSITIONS``; empty cells are not mentioned.
    """
    parts = []
    for pos, d in zip(POSITIONS, layout):
        if d != EMPTY:
            w = DIGIT_WORDS[int(d)]
            parts.append(f"{_article(w)} {w} at the {pos}")
    if not parts:
        raise ValueError("a layout needs at least one digit")
    return " and ".join(parts)


def random_layouts(n: int, g: torch.Generator, min_objects: int = 1, max_objects: int = 4,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 4]`` long: ``counts`` (default uniform in [min, max]) digits in distinct random cells."""
    if counts is None:
        counts = torch.randint(min_objects, max_objects + 1, (n,), generator=g)
    digits = torch.randint(10, (n, 4), generator=g)
    order = torch.rand(n, 4, generator=g).argsort(1)  # a random permutation of the cells per row
    keep = torch.zeros(n, 4, dtype=torch.bool)
    keep.scatter_(1, order, torch.arange(4).expand(n, 4) < counts.view(-1, 1))
    return torch.where(keep, digits, torch.full_like(digits, EMPTY))


def repeat_digits(layouts: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """With probability ``p`` per scene, every digit of it becomes the scene's first digit
    (``(3, -1, 5, 7)`` -> ``(3, -1, 3, 3)``): the scenes of the ``copies`` recipe, in which
    :func:`render` draws same-class digits as one instance."""
    same = torch.rand(layouts.shape[0], generator=g) < p
    present = layouts != EMPTY
    first = layouts.gather(1, present.int().argmax(1, keepdim=True))  # first non-empty cell
    return torch.where(same.view(-1, 1) & present, first.expand_as(layouts), layouts)


@functools.lru_cache(maxsize=2)
def cell_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's digits at ``DIGIT_SIZE`` ([N, 12, 12] in [0, 1]) and their labels."""
    from edm.digits.data import digit_images

    x, y = digit_images(split, size=DIGIT_SIZE)
    return x[:, 0], y


BACKGROUNDS = ("empty", "texture")
TEXTURE_MAX = 0.3  # brightest texture pixel: stroke pixels (> 0.5) stay apart from it


def render(layouts: torch.Tensor, g: torch.Generator, split: str = "train",
           background: str = "empty", copies: bool = False) -> torch.Tensor:
    """Scenes for ``layouts`` ``[n, 4]``: float ``[n, 1, 32, 32]`` in [0, 1].

    Each digit is a random image of its class from ``split``, at a random offset in its cell.
    ``background="texture"`` (an experiment for issue 14, not the shipped model): a smooth random
    field per scene (4x4 and 8x8 noise, bicubic to 32x32, in ``[0, TEXTURE_MAX]``) under the
    digits, so background tokens differ from each other; drawn after every ``empty`` draw, so
    the digits and offsets of a seed are the same with either background.

    ``copies=True`` (the copies experiment of issue 14): the digits of one class in a scene are
    one image (each at its own offset), so the second copy's strokes are fixed by the first one
    16 pixels away -- a dependency no convolution at the first levels spans and self-attention
    can. Same draws as without, so only the repeated digits' images change.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    images, labels = cell_digits(split)
    pools = [torch.nonzero(labels == d).flatten() for d in range(10)]
    n = layouts.shape[0]
    pick = torch.randint(1 << 30, (n, 4), generator=g)
    off = torch.randint(JITTER + 1, (n, 4, 2), generator=g)
    out = torch.zeros(n, 1, CANVAS, CANVAS)
    for i in range(n):
        for c in range(4):
            d = int(layouts[i, c])
            if d == EMPTY:
                continue
            src = next(j for j in range(4) if int(layouts[i, j]) == d) if copies else c
            img = images[pools[d][int(pick[i, src]) % len(pools[d])]]
            y0 = (c // 2) * CELL + int(off[i, c, 0])
            x0 = (c % 2) * CELL + int(off[i, c, 1])
            out[i, 0, y0 : y0 + DIGIT_SIZE, x0 : x0 + DIGIT_SIZE] = img
    if background == "texture":
        field = sum(F.interpolate(torch.rand(n, 1, r, r, generator=g), size=(CANVAS, CANVAS),
                                  mode="bicubic", align_corners=False) for r in (4, 8)) / 2
        lo, hi = field.amin((2, 3), keepdim=True), field.amax((2, 3), keepdim=True)
        out = torch.maximum(out, (field - lo) / (hi - lo).clamp_min(1e-6) * TEXTURE_MAX)
    return out


def cell_crops(images: torch.Tensor) -> torch.Tensor:
    """``[n, 1, 32, 32]`` -> ``[n * 4, 1, 16, 16]``: image ``i``'s cells at rows ``4i .. 4i+3``
    in ``POSITIONS`` order. Other sizes are resized to the canvas first (antialiased)."""
    if images.shape[-2:] != (CANVAS, CANVAS):
        images = F.interpolate(images, size=(CANVAS, CANVAS), mode="bilinear", antialias=True)
    n = images.shape[0]
    cells = images.unfold(2, CELL, CELL).unfold(3, CELL, CELL)  # [n, 1, 2, 2, 16, 16]
    return cells.permute(0, 2, 3, 1, 4, 5).reshape(n * 4, 1, CELL, CELL)


def cell_labels(layouts: torch.Tensor) -> torch.Tensor:
    """Classifier targets of :func:`cell_crops` rows: the digit, or ``EMPTY_CLASS``."""
    flat = layouts.reshape(-1)
    return torch.where(flat == EMPTY, torch.full_like(flat, EMPTY_CLASS), flat)

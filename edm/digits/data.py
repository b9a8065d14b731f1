"""The digits data: scikit-learn's bundled 8x8 digits, split once, upsampled to 16x16.

Everything that trains or evaluates on real digits (the diffusion model, the classifier, the
evaluator's reference statistics, Diff-Pruning's fine-tuning data) goes through
:func:`digit_images`, so the split and the upsampling are defined exactly once.

The split is fixed (not a parameter): a seeded per-class permutation holds out
``HELDOUT_FRACTION`` of every class. Changing it would silently change every reported FID.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The canonical prompt (evaluation). Training also sees the other templates, so prompts worded a
# little differently (calibration sets, user prompts) stay in distribution.
CANONICAL_TEMPLATE = "a handwritten digit {word}"
# Numeral templates ("digit {digit}") were tried and dropped: with them the canonical prompt
# reached 0.93 prompt accuracy after 2000 steps, the numeral prompts only 0.69-0.78.
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the digit {word}",
    "a handwritten {word}",
    "the number {word}",
)

IMAGE_SIZE = 16
HELDOUT_FRACTION = 0.2
_SPLIT_SEED = 0
SPLITS = ("train", "heldout")


def digit_prompt(label: int, template: str = CANONICAL_TEMPLATE) -> str:
    """The prompt for digit ``label``: ``template`` may use ``{word}`` ("seven") and ``{digit}`` ("7")."""
    return template.format(word=DIGIT_WORDS[label], digit=str(label))


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the fixed train / held-out split, stratified by class, sorted."""
    rng = np.random.RandomState(_SPLIT_SEED)
    held = []
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[: round(HELDOUT_FRACTION * len(idx))])
    held_idx = np.sort(np.concatenate(held))
    train_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return {"train": train_idx, "heldout": held_idx}


def upsample(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] values 0..16 -> float [N, 1, size, size] in [0, 1] (bilinear, like training)."""
    x = torch.as_tensor(images8, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0)


def digit_images(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits of one split.

    Args:
        split: ``train`` (used to train the diffusion model and the classifier) or ``heldout``
            (evaluation reference; never trained on).
        size: output resolution; 16 matches the shipped model.

    Returns:
        ``(images float [N, 1, size, size] in [0, 1], labels long [N])``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; allowed: {', '.join(SPLITS)}")
    images, target = all_digits()
    idx = split_indices(target)[split]
    return upsample(images[idx], size), torch.as_tensor(target[idx], dtype=torch.long)


@functools.lru_cache(maxsize=1)
def all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All of scikit-learn's digits: (images [1797, 8, 8] 0..16, labels), read-only, parsed once."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    images, target = ds.images.copy(), ds.target.copy()
    images.flags.writeable = target.flags.writeable = False  # shared by every caller
    return images, target


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] floats to the 256 levels a PNG stores, so real and generated images match."""
    return (images.clamp(0, 1) * 255).round() / 255

"""The digit classifier behind ``eval=digits``: a small CNN on 16x16 digits.

Its penultimate activations (``FEATURE_DIM`` numbers after global average pooling) are the
feature space of the digit FID, the embedded analogue of Inception features; its argmax is the
embedded analogue of a CLIP score (does the image show the digit the prompt names?).
Trained by :mod:`edm.digits.train_classifier` on the train split only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edm.digits.components import WEIGHTS_DIR

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv(1->w) -> conv(w->2w, /2) -> conv(2w->2w, /2) -> linear(32w->64) -> linear(64->10).

    Input: float ``[B, 1, 16, 16]`` in [0, 1]. No batch norm, so features do not depend on the
    batch composition. Features are the 64 pre-activations of the last hidden layer.
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),  # keep the 4x4 layout: where a stroke is matters for digits
            nn.Linear(2 * width * 16, feature_dim),
        )
        self.head = nn.Linear(feature_dim, num_classes)  # 11 for layout cells (10 = empty)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` (the digit-FID space), before the ReLU:
        dead ReLU units would make the feature covariance singular."""
        return self.body(x * 2 - 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]`` from :meth:`features`."""
        return self.head(torch.relu(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


def save_classifier(model: DigitClassifier, out_dir: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CLASSIFIER_WEIGHTS))
    (out / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")


def classifier_path(weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir or WEIGHTS_DIR) / CLASSIFIER_WEIGHTS


def load_classifier(weights_dir: str | Path | None = None) -> DigitClassifier:
    """The shipped (or ``weights_dir``'s) classifier in eval mode."""
    from safetensors.torch import load_file

    path = classifier_path(weights_dir)
    meta_path = path.with_name(CLASSIFIER_CONFIG)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = DigitClassifier(width=meta.get("width", 16), feature_dim=meta.get("feature_dim", FEATURE_DIM),
                            num_classes=meta.get("num_classes", 10))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)

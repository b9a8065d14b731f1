"""``eval=digits``: digit-feature FID and prompt accuracy for the embedded digits model.

The project's own digit classifier (:mod:`edm.digits.classifier`, trained on the train split)
plays the roles Inception and CLIP play for Stable Diffusion:

* ``digit_fid``: Frechet distance between the classifier's penultimate features of the
  generated images and of the held-out real digits (never seen by the diffusion model or the
  classifier), upsampled to 16x16 exactly as in training and quantized to 8 bits like a PNG.
  Features are divided by the real digits' RMS feature standard deviation, so the unit is
  "average feature variance" rather than the classifier's arbitrary activation scale.
* ``prompt_acc``: fraction of images classified as the digit their prompt names
  (``PromptItem.meta["label"]``, else a digit word/numeral parsed from the prompt).
* ``digit_fid_floor``: the same FID for real *training* digits with the same labels and count
  as the evaluated set (mean of 5 seeded draws) -- what a generator that reproduces its training
  data would score. FID is biased upwards for small sets, so compare ``digit_fid`` with this,
  not with 0; single sets scatter around it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edm.errors import MissingWeightsError
from edm.eval.base import ImageSet, PromptItem
from edm.eval.frechet import frechet_distance

log = logging.getLogger(__name__)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def label_of(item: PromptItem) -> int | None:
    """The digit an item asks for: ``meta["label"]``, else the first digit word/numeral in the prompt."""
    if "label" in item.meta:
        return int(item.meta["label"])
    for w in re.findall(r"[a-z0-9]+", item.prompt.lower()):
        if w in _NUMBER_WORDS:
            return _NUMBER_WORDS.index(w)
        if len(w) == 1 and w.isdigit():
            return int(w)
    return None


class DigitsEval:
    """Digit FID + prompt accuracy with the project's digit classifier.

    Args:
        weights_dir: folder holding ``classifier.safetensors``; ``None`` = the one shipped in
            ``edm/digits/weights`` (``python -m edm.digits.train_classifier`` re-creates it).
        batch_size: images per classifier batch (memory only; results do not depend on it).
        floor: also report ``digit_fid_floor`` (real training digits, same labels and count,
            mean of 5 draws).
    """

    name = "digits"

    def __init__(self, weights_dir: str | None = None, batch_size: int = 256, floor: bool = True):
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.batch_size = int(batch_size)
        self.floor = bool(floor)
        self._model = None
        self._reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check(self) -> None:
        from edm.digits.classifier import classifier_path

        path = classifier_path(self.weights_dir)
        if not path.exists():
            raise MissingWeightsError(
                f"<eval.digits.weights_dir> digit classifier not found at {path}; create it with "
                f"`python -m edm.digits.train_classifier --out {path.parent}`"
            )

    @property
    def model(self):
        if self._model is None:
            from edm.digits.classifier import load_classifier

            self.check()
            self._model = load_classifier(self.weights_dir)
        return self._model

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float ``[B, 1, H, W]`` in [0, 1] -> (features ``[B, D]``, probabilities ``[B, 10]``)."""
        from edm.digits.data import IMAGE_SIZE

        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        feats, probs = [], []
        for chunk in images.split(self.batch_size):
            f = self.model.features(chunk)
            feats.append(f)
            probs.append(self.model.logits(f).softmax(-1))
        return torch.cat(feats), torch.cat(probs)

    def reference_features(self, split: str = "heldout") -> tuple[torch.Tensor, torch.Tensor]:
        """Features of real digits of ``split`` (quantized like PNGs), and their labels."""
        from edm.digits.data import digit_images, quantize

        if split not in self._reference:
            x, y = digit_images(split)
            self._reference[split] = (self.classify(quantize(x))[0], y)
        return self._reference[split]

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        if len(images) < 2:
            raise ValueError("digit FID needs at least 2 images")
        feats, probs = [], []
        for batch, _ in images.iter_batches(self.batch_size, mode="L"):
            f, p = self.classify(batch.float() / 255.0)
            feats.append(f)
            probs.append(p)
        feats, probs = torch.cat(feats), torch.cat(probs)
        conf, pred = probs.max(-1)

        ref, _ = self.reference_features("heldout")
        # Unit: the mean per-feature variance of the real digits, so the number does not depend
        # on the arbitrary scale of the classifier's activations.
        scale = ref.var(0).mean().sqrt()
        feats, ref = feats / scale, ref / scale
        out: dict[str, float | list[float]] = {
            "digit_fid": frechet_distance(*feature_stats(feats), *feature_stats(ref)),
            "mean_confidence": conf.mean().item(),
        }
        labels = [label_of(it) for it in images.items]
        known = [i for i, lab in enumerate(labels) if lab is not None]
        if known:
            hits = [int(pred[i]) == labels[i] for i in known]
            out["prompt_acc"] = float(np.mean(hits))
        else:
            log.info("eval.digits: no prompt names a digit; prompt_acc skipped")
        if self.floor and known:
            out["digit_fid_floor"] = self._floor([labels[i] for i in known], ref, scale)
        out["pred_label"] = [float(v) for v in pred.tolist()]
        out["confidence"] = [float(v) for v in conf.tolist()]
        return out

    def _floor(self, labels: list[int], ref: torch.Tensor, scale: torch.Tensor,
               draws: int = 5) -> float:
        """Mean FID of ``draws`` seeded sets of real training digits with the given labels."""
        train_feats, train_y = self.reference_features("train")
        train_feats = train_feats / scale
        pools = {d: torch.nonzero(train_y == d).flatten() for d in range(10)}
        fids = []
        for r in range(draws):
            g = torch.Generator().manual_seed(r)
            perm = {d: p[torch.randperm(len(p), generator=g)].tolist() for d, p in pools.items()}
            counts = dict.fromkeys(range(10), 0)
            pick = []
            for lab in labels:  # distinct images while the class has enough, then wrap around
                pick.append(perm[lab][counts[lab] % len(perm[lab])])
                counts[lab] += 1
            fids.append(frechet_distance(*feature_stats(train_feats[pick]), *feature_stats(ref)))
        return float(np.mean(fids))

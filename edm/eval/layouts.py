"""``eval=layouts``: cell-feature FID and per-object accuracy for the embedded layouts model.

The cell classifier (:mod:`edm.layouts.train_classifier`: 16x16 cell -> digit 0-9 or empty)
reads each of the four cells of a 32x32 scene:

* ``object_acc``: fraction of the objects a prompt names that are found, as that digit, in the
  cell it names (identity and position);
* ``empty_acc``: fraction of the cells the prompt leaves empty that are classified empty;
* ``scene_acc``: fraction of images with all four cells right;
* ``layout_fid``: Frechet distance between the classifier's penultimate features of the
  generated cells and of the cells of held-out-digit reference scenes (random layouts of the
  training distribution, seeded), in units of the reference's RMS feature std (as ``digit_fid``);
* ``layout_fid_floor``: the same for real train-digit scenes with exactly the evaluated
  layouts (mean of 5 seeded draws) -- compare ``layout_fid`` with this, not with 0;
* ``copy_err`` (only when some prompt names one digit in two or more cells): for each such pair
  of cells, the mean absolute pixel difference of the two cells at their best relative shift
  (within the jitter), averaged over pairs. The copies model's real scenes draw the digits of
  one class as one image, so real scenes score 0; ``copy_err_independent`` is the same for
  real scenes of these layouts with independently drawn digits: what ignoring the copy costs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from edm.digits.data import DIGIT_WORDS
from edm.errors import MissingWeightsError
from edm.eval.base import ImageSet, PromptItem
from edm.eval.digits import feature_stats
from edm.eval.frechet import frechet_distance

_OBJECT = re.compile(r"\ban? (\w+) at the (top left|top right|bottom left|bottom right)\b")


def layout_of(item: PromptItem) -> list[int] | None:
    """The four cell contents an item asks for: ``meta["layout"]``, else parsed from the prompt."""
    from edm.layouts.data import EMPTY, POSITIONS

    if "layout" in item.meta:
        return [int(v) for v in item.meta["layout"]]
    layout = [EMPTY] * 4
    for word, pos in _OBJECT.findall(item.prompt.lower()):
        if word in DIGIT_WORDS:
            layout[POSITIONS.index(pos)] = DIGIT_WORDS.index(word)
    return layout if any(v != EMPTY for v in layout) else None


class LayoutsEval:
    """Per-object accuracy + cell-feature FID with the layouts cell classifier.

    Args:
        weights_dir: folder with ``classifier.safetensors``; ``None`` = ``edm/layouts/weights``.
        batch_size: cells per classifier batch (memory only).
        reference_scenes: held-out reference scenes (x 4 cells) for the FID.
        floor: also report ``layout_fid_floor``.
    """

    name = "layouts"

    def __init__(self, weights_dir: str | None = None, batch_size: int = 1024,
                 reference_scenes: int = 1000, floor: bool = True):
        from edm.layouts.components import WEIGHTS_DIR

        self.weights_dir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
        self.batch_size, self.reference_scenes, self.floor = int(batch_size), int(reference_scenes), bool(floor)
        self._model = self._reference = None

    def check(self) -> None:
        from edm.digits.classifier import classifier_path

        path = classifier_path(self.weights_dir)
        if not path.exists():
            raise MissingWeightsError(
                f"<eval.layouts.weights_dir> cell classifier not found at {path}; create it with "
                f"`python -m edm.layouts.train_classifier --out {path.parent}`"
            )

    @property
    def model(self):
        if self._model is None:
            from edm.digits.classifier import load_classifier

            self.check()
            self._model = load_classifier(self.weights_dir)
        return self._model

    @torch.no_grad()
    def classify_cells(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scenes ``[n, 1, H, W]`` in [0, 1] -> (cell features ``[4n, D]``, predictions ``[n, 4]``)."""
        from edm.layouts.data import cell_crops

        feats, preds = [], []
        for chunk in cell_crops(images).split(self.batch_size):
            f = self.model.features(chunk)
            feats.append(f)
            preds.append(self.model.logits(f).argmax(-1))
        return torch.cat(feats), torch.cat(preds).view(-1, 4)

    def _scenes(self, layouts: torch.Tensor, seed: int, split: str) -> torch.Tensor:
        from edm.layouts.data import quantize, render

        return quantize(render(layouts, torch.Generator().manual_seed(seed), split))

    def reference(self) -> torch.Tensor:
        """Cell features of the held-out reference scenes (seeded, cached)."""
        if self._reference is None:
            from edm.layouts.data import random_layouts

            lay = random_layouts(self.reference_scenes, torch.Generator().manual_seed(12345))
            self._reference = self.classify_cells(self._scenes(lay, 12346, "heldout"))[0]
        return self._reference

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        from edm.layouts.data import EMPTY, EMPTY_CLASS

        if len(images) < 2:
            raise ValueError("layout FID needs at least 2 images")
        batches = [b.float() / 255.0 for b, _ in images.iter_batches(256, mode="L")]
        feats, pred = self.classify_cells(torch.cat(batches))
        ref = self.reference()
        scale = ref.var(0).mean().sqrt()
        out: dict[str, float | list[float]] = {
            "layout_fid": frechet_distance(*feature_stats(feats / scale), *feature_stats(ref / scale)),
        }
        layouts = [layout_of(it) for it in images.items]
        known = [i for i, lay in enumerate(layouts) if lay is not None]
        if known:
            want = torch.tensor([layouts[i] for i in known])
            got = pred[known]
            target = torch.where(want == EMPTY, EMPTY_CLASS, want)
            hit, obj = got == target, want != EMPTY
            out["object_acc"] = hit[obj].float().mean().item()
            out["empty_acc"] = hit[~obj].float().mean().item() if (~obj).any() else 1.0
            out["scene_acc"] = hit.all(1).float().mean().item()
            if self.floor:
                fids = [frechet_distance(*feature_stats(self.classify_cells(self._scenes(want, r, "train"))[0] / scale),
                                         *feature_stats(ref / scale)) for r in range(5)]
                out["layout_fid_floor"] = float(np.mean(fids))
            pairs = same_digit_pairs(want)
            if len(pairs):
                scenes = torch.cat(batches)[known]
                out["copy_err"] = copy_error(scenes, pairs)
                out["copy_err_independent"] = copy_error(self._scenes(want, 7, "train"), pairs)
        out["pred_cells"] = [float(v) for v in pred.flatten().tolist()]
        return out


def same_digit_pairs(layouts: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` layouts -> ``[P, 3]`` rows ``(scene, cell a, cell b)``, ``a < b``, same digit."""
    from edm.layouts.data import EMPTY

    rows = [(i, a, b) for i, lay in enumerate(layouts.tolist()) for a in range(4) for b in range(a + 1, 4)
            if lay[a] != EMPTY and lay[a] == lay[b]]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


def copy_error(scenes: torch.Tensor, pairs: torch.Tensor) -> float:
    """Mean over ``pairs`` of min over shifts ``|dy|, |dx| <= JITTER`` of the mean absolute
    difference between cell ``a`` shifted (zero fill) and cell ``b`` of scenes ``[n, 1, 32, 32]``."""
    from edm.layouts.data import CELL, JITTER, cell_crops

    cells = cell_crops(scenes).view(-1, 4, CELL, CELL)
    a, b = cells[pairs[:, 0], pairs[:, 1]], cells[pairs[:, 0], pairs[:, 2]]
    padded = torch.nn.functional.pad(a, (JITTER,) * 4)
    span = range(2 * JITTER + 1)
    diffs = torch.stack([(padded[:, y : y + CELL, x : x + CELL] - b).abs().mean((1, 2))
                         for y in span for x in span], 1)
    return diffs.amin(1).mean().item()

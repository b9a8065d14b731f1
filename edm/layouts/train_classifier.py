"""Train the cell classifier of the layouts evaluator: 16x16 cells -> digit 0-9 or empty (10).

    python -m edm.layouts.train_classifier --out edm/layouts/weights

The digits classifier's CNN (:class:`edm.digits.classifier.DigitClassifier`) with an 11-way
head, on the cells of scenes rendered from the train split (so it sees the jittered 12x12
digits the diffusion model is trained on, and empty cells), quantized to 8 bits like PNGs.
Deterministic (seeded generator, fixed threads); reports accuracy on held-out-digit scenes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edm.digits.classifier import DigitClassifier, save_classifier
from edm.layouts.data import NUM_CLASSES, cell_crops, cell_labels, quantize, random_layouts, render

log = logging.getLogger(__name__)


def cells(n_scenes: int, g: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized cells ``[4 n, 1, 16, 16]`` and labels of ``n_scenes`` random scenes."""
    lay = random_layouts(n_scenes, g)
    return quantize(cell_crops(render(lay, g, split))), cell_labels(lay)


def train_classifier(out: Path, scenes: int = 4000, epochs: int = 8, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(num_classes=NUM_CLASSES)
    x, y = cells(scenes, g, "train")
    xh, yh = cells(scenes // 4, g, "heldout")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d loss %.4f", epoch + 1, loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(xh).argmax(1) == yh).float().mean().item()
        train_acc = (model(x).argmax(1) == y).float().mean().item()
    meta = {
        "width": 16, "feature_dim": model.head.in_features, "num_classes": NUM_CLASSES,
        "heldout_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4),
        "scenes": scenes, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "threads": threads, "train_seconds": round(time.time() - t0, 1),
    }
    save_classifier(model, out, meta)
    log.info("held-out cell accuracy %.4f (train %.4f); saved to %s", acc, train_acc, out)
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_classifier(a.out, scenes=a.scenes, epochs=a.epochs, seed=a.seed, threads=a.threads)


if __name__ == "__main__":
    main()

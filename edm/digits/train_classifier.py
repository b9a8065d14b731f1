"""Train the digit classifier used by ``eval=digits`` (train split only; reports held-out accuracy).

    python -m edm.digits.train_classifier --out edm/digits/weights

Deterministic like :mod:`edm.digits.train` (seeded generator, fixed threads, deterministic
algorithms). Augmentation is light (random 1-pixel shifts, images quantized to 8 bits like PNGs)
so that the classifier reads generated digits the way it reads real ones without becoming blind
to the differences FID should see.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edm.digits.classifier import DigitClassifier, save_classifier
from edm.digits.data import digit_images, quantize

log = logging.getLogger(__name__)


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero fill). x: [B, 1, H, W]."""
    B, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(2 * max_shift + 1, (B,), generator=g)
    dx = torch.randint(2 * max_shift + 1, (B,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def train_classifier(
    out: Path, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, threads: int = 1
) -> dict:
    """Train, evaluate on the held-out split, save; returns the metadata written."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    model = DigitClassifier()
    x, y = digit_images("train")
    xh, yh = digit_images("heldout")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            xb = quantize(random_shift(x[idx], g))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d loss %.4f", epoch + 1, loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(quantize(xh)).argmax(1) == yh).float().mean().item()
        train_acc = (model(quantize(x)).argmax(1) == y).float().mean().item()
    meta = {
        "width": 16,
        "feature_dim": model.head.in_features,
        "heldout_accuracy": round(acc, 4),
        "train_accuracy": round(train_acc, 4),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "train_seconds": round(time.time() - t0, 1),
    }
    save_classifier(model, out, meta)
    log.info("held-out accuracy %.4f (train %.4f); saved to %s", acc, train_acc, out)
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_classifier(a.out, epochs=a.epochs, seed=a.seed, threads=a.threads)


if __name__ == "__main__":
    main()

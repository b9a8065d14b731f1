"""Train the embedded digits model (reproducibly) and write its checkpoint.

    python -m edm.digits.train --out edm/digits/weights          # the shipped checkpoint

Bit-identical across runs on the same machine type and library versions: a fixed thread count
(results depend on it, so it is part of the recipe and recorded in ``config.json``),
``torch.use_deterministic_algorithms(True)``, and every random draw (batch indices, timesteps,
noise, prompt templates, prompt dropout) from one seeded ``torch.Generator``.

Recipe: epsilon-prediction DDPM loss on the cosine (``squaredcos_cap_v2``) schedule, the train
split of scikit-learn's digits upsampled to 16x16 and scaled to [-1, 1], prompts from
``TRAIN_TEMPLATES`` with 10 % replaced by the empty prompt (for classifier-free guidance), AdamW
with warm-up and cosine decay, and an EMA of the weights (the EMA is what is saved).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edm.digits.components import build_components, default_config, save_checkpoint
from edm.digits.data import TRAIN_TEMPLATES, digit_images, digit_prompt

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--preset", default="small", choices=["small", "base"], help="UNet size")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (with 1/t warm-up)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="empty-prompt dropout for CFG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="part of the recipe: results depend on it")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save EMA every N steps")
    p.add_argument("--snapshot-dir", type=Path, default=None, help="where snapshots go (step_N/)")
    return p.parse_args(argv)


def prompt_table(pipe_components: dict) -> torch.Tensor:
    """Frozen text embeddings of every (template, digit) prompt, then the empty prompt last.

    Row ``j * 10 + d`` is template ``j`` for digit ``d``; row ``-1`` is ``""``. The encoder is
    frozen, so encoding once replaces encoding every batch.
    """
    tok, enc = pipe_components["tokenizer"], pipe_components["text_encoder"]
    texts = [digit_prompt(d, t) for t in TRAIN_TEMPLATES for d in range(10)] + [""]
    ids = tok(texts, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0]


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> dict:
    """Train and save; returns the config written to ``config.json``."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    config = default_config(args.preset)
    comps = build_components(config, seed=args.seed)
    unet, sched = comps["unet"], comps["scheduler"]
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)

    images, labels = digit_images("train")
    x_all = images * 2 - 1  # [N, 1, 16, 16] in [-1, 1]
    table = prompt_table(comps)
    n_templates = len(TRAIN_TEMPLATES)
    alphas = sched.alphas_cumprod.float()
    T = sched.config.num_train_timesteps

    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, args.warmup))
    ema_params = list(ema.parameters())
    log.info(
        "training digits/%s: %d params, %d images, %d steps x %d, %d threads",
        args.preset, sum(p.numel() for p in unet.parameters()), len(x_all), args.steps,
        args.batch_size, args.threads,
    )
    t0, cpu0, running = time.time(), time.process_time(), 0.0
    for step in range(args.steps):
        idx = torch.randint(len(x_all), (args.batch_size,), generator=g)
        x0, y = x_all[idx], labels[idx]
        t = torch.randint(T, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        tmpl = torch.randint(n_templates, (args.batch_size,), generator=g)
        row = tmpl * 10 + y
        row = torch.where(torch.rand(args.batch_size, generator=g) < args.p_uncond, -1, row)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        pred = unet(xt, t, encoder_hidden_states=table[row]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched_lr.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            log.info("step %d loss %.4f (%.0fs)", step + 1, running / args.log_every, time.time() - t0)
            running = 0.0
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and args.snapshot_dir:
            save_checkpoint(args.snapshot_dir / f"step_{step + 1}", ema, comps["text_encoder"], config)

    seconds = time.time() - t0
    config["train"] = {
        **{k: v for k, v in vars(args).items() if not isinstance(v, Path) and v is not None},
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "torch": torch.__version__,
    }
    save_checkpoint(args.out, ema, comps["text_encoder"], config)
    log.info("saved %s after %.0fs", args.out, seconds)
    return config


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()

"""Train the embedded layouts model (reproducibly) and write its checkpoint.

    python -m edm.layouts.train --out edm/layouts/weights        # the shipped checkpoint

Deterministic like :mod:`edm.digits.train` (one seeded generator for every draw, a fixed thread
count recorded in ``config.json``, ``torch.use_deterministic_algorithms(True)``): a rerun with
the same arguments, machine type and library versions writes byte-identical weights.

Recipe: the digits recipe (DDPM loss on the cosine schedule, AdamW with warm-up and cosine
decay, EMA of the weights, 10 % empty prompts for classifier-free guidance) on scenes rendered
on the fly from the train split (:func:`edm.layouts.data.render`, 1-4 digits in random cells),
with the text encoder trained jointly (its EMA is saved too), and three changes, each measured
(``experiments/results/layouts_premeasure.md``):

* v-prediction instead of epsilon: with epsilon, samples at 500 steps had grey, noisy
  backgrounds (cell FID 69-94 against a floor of 0.36); with v, 2.0 at 250 steps;
* the padding tokens masked out of the UNet's cross-attention (``encoder_attention_mask``;
  the pipeline does the same, ``mask_padding`` in ``config.json``);
* logit-normal timesteps (SD3's sampling): more of the mid-noise steps where a digit's
  identity is decided -- the model learnt *where* the prompt's digits go within 250 steps but
  not *which* digits (a wrong digit word left the loss unchanged after 1000 steps).

and two more so that its self-attention matters (the point of the model: token pruning is
judged by what attention ranks; without them row entropy was 0.955-0.997 of the maximum and
uniform maps left the images unchanged -- that model is ``experiments/checkpoints/layouts_flat``,
``--copies 0 --qk-init-scale 1``):

* copies (``--copies 0.5``): the same-class digits of a scene are one image, and half the scenes
  have all digits of one class, so one copy's strokes are predictable from another's 16 px away;
* query/key weights of every self-attention x3 at init (``--qk-init-scale 3``, logits x9): the
  maps start peaked and stay so (row entropy 0.69-0.91), and uniform maps at the 32x32 layers
  then raise the cell FID from 0.44 to 1.50. Data alone (copies with scale 1) stayed flat.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edm.digits.components import UNET_PRESETS, build_components, save_checkpoint
from edm.digits.train import lr_at
from edm.layouts.components import default_config
from edm.layouts.data import layout_prompt, random_layouts, render, repeat_digits
from edm.methods.weight.finetune import training_target

log = logging.getLogger(__name__)


def _probability(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return v


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--preset", default="small", choices=list(UNET_PRESETS), help="UNet size")
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (with 1/t warm-up)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="empty-prompt dropout for CFG")
    p.add_argument("--embed-std", type=float, default=1.0,
                   help="init std of the text encoder's token and position embeddings")
    p.add_argument("--max-objects", type=int, default=4, choices=[1, 2, 3, 4],
                   help="digits per scene: 1 to this many (1 = a one-object curriculum probe)")
    p.add_argument("--prediction", default="v_prediction", choices=["epsilon", "v_prediction"],
                   help="the UNet's target (the scheduler's prediction_type)")
    p.add_argument("--t-sampling", default="logit_normal", choices=["uniform", "logit_normal"],
                   help="training timesteps: uniform, or logit-normal(0, 1) in t/T (SD3's choice:\n"
                        "more of the mid-noise steps where a digit's identity is decided)")
    p.add_argument("--mask-padding", type=int, default=1, choices=[0, 1],
                   help="1 = the UNet's cross-attention skips the padding tokens (encoder_attention_mask)")
    p.add_argument("--background", default="empty", choices=["empty", "texture"],
                   help="texture: smooth random backgrounds (experiment: do differing background "
                        "tokens make self-attention less uniform?)")
    p.add_argument("--copies", type=_probability, default=0.5,
                   help="> 0 draws same-class digits of a scene as one image (copies) and makes a\n"
                        "scene's digits all one class with this probability (0 = the model shipped\n"
                        "before, experiments/checkpoints/layouts_flat, with --qk-init-scale 1)")
    p.add_argument("--qk-init-scale", type=_positive, default=3.0,
                   help="multiply the self-attention query and key weights by this at init\n"
                        "(logits x scale^2); with 1 the maps stay nearly uniform and unused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="part of the recipe: results depend on it")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save EMA every N steps")
    p.add_argument("--snapshot-dir", type=Path, default=None, help="where snapshots go (step_N/)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="save and stop after N steps of the --steps schedule (0 = all): checks a\n"
                        "snapshot of a long run byte for byte without rerunning all of it")
    return p.parse_args(argv)


def batch(bs: int, g: torch.Generator, p_uncond: float, max_objects: int = 4,
          background: str = "empty", copies: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Scenes in [-1, 1] and their prompts ("" with probability ``p_uncond``)."""
    layouts = random_layouts(bs, g, max_objects=max_objects)
    if copies:  # no extra draws otherwise: the shipped recipe's stream stays as it was
        layouts = repeat_digits(layouts, g, copies)
    x0 = render(layouts, g, "train", background, copies=copies > 0) * 2 - 1
    drop = torch.rand(bs, generator=g) < p_uncond
    prompts = ["" if d else layout_prompt(lay.tolist()) for lay, d in zip(layouts, drop)]
    return x0, prompts


@torch.no_grad()
def scale_self_attention_qk(unet: torch.nn.Module, scale: float) -> int:
    """Multiply every self-attention's (``attn1``) query and key weights by ``scale``, so its
    logits grow by ``scale**2``; returns how many layers were changed."""
    from edm.families import UNetAdapter  # the one place that names a UNet's attention layers

    layers = [layer.attn1 for blk in UNetAdapter().attention_blocks(unet) for _, layer in blk.layers]
    for m in layers:
        m.to_q.weight.mul_(scale)
        m.to_k.weight.mul_(scale)
    return len(layers)


def train(args: argparse.Namespace) -> dict:
    """Train and save; returns the config written to ``config.json``."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    config = default_config(args.preset)
    config["scheduler"]["prediction_type"] = args.prediction
    config["pipeline"] = {"mask_padding": bool(args.mask_padding)}  # read by DigitsLoader
    comps = build_components(config, seed=args.seed)
    unet, enc, tok, sched = comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"]
    # CLIP initialises both embeddings with std 0.02, so the words are a few % of each token's
    # hidden state, and joint training did not change that (after 2000 steps "a four" vs "a
    # seven" at the top left: 0.66 apart at the digit token, in states of norm 5.3). With
    # unit-variance embeddings they are 4.5-4.8 apart from the start. (That alone did not make
    # the UNet bind digits to positions within 2000 steps: issue 14's notes.)
    if args.embed_std:
        ge = torch.Generator().manual_seed(args.seed + 1)
        emb = enc.get_input_embeddings().weight, enc.embeddings.position_embedding.weight
        with torch.no_grad():
            for w in emb:
                w.copy_(torch.randn(w.shape, generator=ge) * args.embed_std)
    if args.qk_init_scale != 1.0:
        scale_self_attention_qk(unet, args.qk_init_scale)
    unet.train()
    enc.train().requires_grad_(True)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": enc})
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    alphas = sched.alphas_cumprod.float()
    T = sched.config.num_train_timesteps

    g = torch.Generator().manual_seed(args.seed)
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, args.warmup))
    log.info("training layouts/%s: %d params, %d steps x %d, %d threads", args.preset,
             sum(p.numel() for p in params), args.steps, args.batch_size, args.threads)
    t0, cpu0, running = time.time(), time.process_time(), 0.0
    for step in range(args.stop_after or args.steps):
        x0, prompts = batch(args.batch_size, g, args.p_uncond, args.max_objects, args.background,
                           args.copies)
        if args.t_sampling == "uniform":
            t = torch.randint(T, (args.batch_size,), generator=g)
        else:
            u = torch.sigmoid(torch.randn(args.batch_size, generator=g))
            t = (u * T).long().clamp_(0, T - 1)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        enc_in = tok(prompts, padding="max_length", return_tensors="pt")
        ids = enc_in.input_ids
        kw = {"encoder_attention_mask": enc_in.attention_mask} if args.mask_padding else {}
        pred = unet(xt, t, encoder_hidden_states=enc(ids)[0], **kw).sample
        loss = F.mse_loss(pred, training_target(sched, x0, noise, a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched_lr.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), params):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            log.info("step %d loss %.4f (%.0fs)", step + 1, running / args.log_every, time.time() - t0)
            running = 0.0
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and args.snapshot_dir:
            save_checkpoint(args.snapshot_dir / f"step_{step + 1}", ema["unet"], ema["text_encoder"], config)

    seconds = time.time() - t0
    config["train"] = {
        **{k: v for k, v in vars(args).items() if not isinstance(v, Path) and v is not None},
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "torch": torch.__version__,
    }
    save_checkpoint(args.out, ema["unet"], ema["text_encoder"], config)
    log.info("saved %s after %.0fs", args.out, seconds)
    return config


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()

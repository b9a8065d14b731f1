"""Dense quality and background share of a layouts checkpoint (issue 14), before any study.

    python experiments/layouts_probe.py --checkpoint DIR [--prompts 200]

Generates ``--prompts`` layout prompts (``LayoutPrompts``, 25 DDIM steps, CFG 1.1 (the model config's), seeds 0..),
scores them with ``eval=layouts`` (object / empty / scene accuracy, cell-feature FID and its
real-vs-real floor), and reports how much of the canvas is background (pixels < 1/255, which is
the share of first-level attention tokens, 1 token = 1 pixel) for real layouts scenes and for
real digits (the 16x16 digits model's data).

``--uniform-attention all`` (or comma-separated module-name parts, e.g. ``down_blocks.0``)
replaces those self-attention layers' maps by uniform ones (each output row = the mean value
row): if quality does not drop, the model does not use its self-attention, and no token
selection rule can be told apart from another on it. ``--repeat P`` draws the prompts of a
model trained with ``--copies`` (``LayoutPrompts(repeat=P)``; ``copy_err`` is then reported).
``--digits`` runs the same generation and ablation on the 16x16 digits model instead (its
prompts, ``eval=digits``; ``--checkpoint`` defaults to the shipped one, use ``--guidance 1.5``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (required for layouts)")
    ap.add_argument("--digits", action="store_true", help="the digits model, its prompts and eval")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=1.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=4, help="keep only prompts with at most N objects")
    ap.add_argument("--uniform-attention", default="", help="'all' or comma-separated layer-name parts")
    ap.add_argument("--repeat", type=float, default=0.0, help="LayoutPrompts(repeat=...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edm.data.images import ImageSet, image_path
    from edm.data.layouts import LayoutPrompts
    from edm.digits import DigitsLoader
    from edm.digits.data import digit_images
    from edm.eval.layouts import LayoutsEval
    from edm.layouts.data import random_layouts, render

    if not (args.checkpoint or args.digits):
        raise SystemExit("--checkpoint is required for the layouts model")
    pipe = DigitsLoader(args.checkpoint).load()
    if args.uniform_attention:
        parts = args.uniform_attention.split(",")
        from edm.families import adapter

        layers = [f"{n}.attn1" for blk in adapter(pipe).attention_blocks(pipe.unet) for n, _ in blk.layers]
        hit = [n for n in layers if parts == ["all"] or any(p in n for p in parts)]
        if not hit:
            raise SystemExit(f"--uniform-attention {args.uniform_attention!r} matches no attn1 module")
        for n in hit:
            pipe.unet.get_submodule(n).set_processor(UniformAttention())
        print(f"uniform self-attention in {len(hit)} layers: {', '.join(hit)}")
    if args.digits:
        from edm.data.digits import DigitPrompts
        from edm.data.prompts import assign_seeds
        from edm.eval.digits import DigitsEval

        items = assign_seeds(DigitPrompts(num_prompts=args.prompts).load(), 0)
    else:
        items = [it for it in LayoutPrompts(num_prompts=args.prompts, repeat=args.repeat).load()
                 if sum(d >= 0 for d in it.meta["layout"]) <= args.max_objects]
    out = Path(tempfile.mkdtemp(prefix="layouts_probe_"))
    for s in range(0, len(items), 50):
        chunk = items[s : s + 50]
        with torch.no_grad():
            imgs = pipe([it.prompt for it in chunk], num_inference_steps=25, guidance_scale=args.guidance,
                        generator=[torch.Generator().manual_seed(it.index) for it in chunk]).images
        for it, x in zip(chunk, imgs):
            Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(image_path(out, it.index))
    if args.digits:
        metrics = DigitsEval().evaluate(ImageSet(out, items))
        print(f"digits checkpoint {args.checkpoint or '(shipped)'}, {len(items)} prompts, CFG {args.guidance}")
        for k, v in metrics.items():
            if isinstance(v, float):
                print(f"  {k}: {v:.4f}")
        return
    metrics = LayoutsEval().evaluate(ImageSet(out, items))
    print(f"checkpoint {args.checkpoint}, {len(items)} prompts, CFG {args.guidance}, images in {out}")
    for k in ("object_acc", "empty_acc", "scene_acc", "layout_fid", "layout_fid_floor", "copy_err",
              "copy_err_independent"):
        if k in metrics:
            print(f"  {k}: {metrics[k]:.4f}")
    by_count(items, metrics["pred_cells"])
    real = render(random_layouts(1000, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    digits = digit_images("train")[0]
    print(f"  background share (pixel < 1/255): layouts {float((real < 1 / 255).float().mean()):.3f}, "
          f"digits {float((digits < 1 / 255).float().mean()):.3f}")


class UniformAttention:
    """Self-attention processor with a uniform map: every query gets the mean value row."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError("UniformAttention is for [B, N, C] self-attention (attn1) only")
        v = attn.to_v(hidden_states)
        out = attn.to_out[1](attn.to_out[0](v.mean(1, keepdim=True).expand_as(v)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def by_count(items, pred_cells) -> None:
    """Object accuracy per object count, and identity-only accuracy (the named digit anywhere):
    tells a model that draws the right digits in the wrong cells from one that ignores them."""
    pred = torch.tensor(pred_cells).view(-1, 4).long()
    want = torch.tensor([it.meta["layout"] for it in items])
    count = (want >= 0).sum(1)
    for n in sorted(set(count.tolist())):
        rows = count == n
        w, p = want[rows], pred[rows]
        obj = w >= 0
        hit = (w == p)[obj].float().mean().item()
        anywhere = torch.stack([(p == w[:, c : c + 1]).any(1) for c in range(4)], 1)[obj].float().mean().item()
        print(f"  {n} object(s), {int(rows.sum())} prompts: object acc {hit:.3f}, digit anywhere {anywhere:.3f}")


if __name__ == "__main__":
    main()

"""Why does (or doesn't) G-WPR beat random token selection on the embedded digits model?

Runs the dense digits pipeline on a few prompts and, at every self-attention layer and step,
reads the head-mean self-attention map of the conditional CFG half (the map AT-EDM prunes
with) and the layer's output. Per layer it reports

* ``entropy``: mean row entropy of the map / log N (1 = uniform attention, 0 = one-hot);
  ``ink-row entropy``: the same over the rows whose query lies on a stroke only (the rows a
  long-range dependency between objects would sharpen; background rows dominate the mean);
* ``top-k mass``: share of the G-WPR score held by the kept tokens (random keeps k/N of it);
* ``refill err``: ``||y - refill(y[keep])|| / ||y||`` of the layer output when the pruned tokens
  are replaced by a copy of the kept token they attend to most -- AT-EDM's refill, applied to the
  dense output -- for G-WPR keep sets vs random keep sets of the same size;
* ``refill err cosine``: the same with the cosine refill's sources (the most cosine-similar kept
  token, similarity of the layer's normalised input), for the G-WPR keep sets;
* ``source dist``: mean grid distance from a pruned token to the kept token it copies (two
  random cells of an s x s grid are ~0.52 s apart);
* ``ink kept``: share of the kept tokens lying on the digit's strokes (final image, pooled to the
  layer's grid) vs the share of ink tokens in the grid (what random keeps on average);
* ``step corr``: Spearman correlation of G-WPR scores between consecutive steps;
* ``logit std``: the spread of a row's attention logits ``q k / sqrt(d)`` (a softmax over logits
  that differ by a few tenths is nearly uniform whatever the content);
* ``bg mass`` / ``bg entropy``: attention mass on background (non-stroke) keys, and the entropy
  of each row restricted to them (renormalised) / log(#background): 1 = every query treats all
  background tokens alike -- identical keys, which no ranking can tell apart.

    python experiments/digits_gwpr_analysis.py --prompts 20 --prune-ratio 0.5
    python experiments/digits_gwpr_analysis.py --model layouts --checkpoint DIR --prompts 8

``--model layouts`` runs the same statistics on a checkpoint of the layouts model (issue 14:
32x32 canvas, 1-4 digits at named positions); its maps are 16x larger, so use fewer prompts.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rankcorr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm() + 1e-12))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--random-draws", type=int, default=8)
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped model of --model)")
    ap.add_argument("--model", default="digits", choices=["digits", "layouts"], help="prompt set")
    ap.add_argument("--guidance", type=float, default=1.5, help="CFG scale of the sampled trajectories")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=float, default=0.0, help="layouts: LayoutPrompts(repeat=...), the copies model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edm.data.digits import DigitPrompts
    from edm.data.prompts import assign_seeds
    from edm.digits import DigitsLoader
    from edm.eval.attention_stats import row_entropy, self_attention_map
    from edm.families import adapter
    from edm.layouts import LayoutsLoader
    from edm.methods.token.atedm_kernel import (
        assign_by_attention,
        assign_by_cosine,
        gwpr,
        keep_count,
        keep_indices,
        refill,
    )

    loader = LayoutsLoader if args.model == "layouts" else DigitsLoader  # None: that model's shipped weights
    pipe = loader(args.checkpoint).load()
    unet = pipe.unet
    if args.model == "layouts":
        from edm.data.layouts import LayoutPrompts

        items = assign_seeds(LayoutPrompts(num_prompts=args.prompts, repeat=args.repeat).load(), 0)
    else:
        items = assign_seeds(DigitPrompts(num_prompts=args.prompts).load(), 0)
    height, width = pipe.sample_size
    step = {"i": -1}
    maps, outs, ins = {}, {}, {}  # (layer, step) -> cond-half map / output / attn1 input
    logit_std = defaultdict(list)  # layer -> per-step row-logit spread
    hooks = [unet.register_forward_pre_hook(lambda m, a: step.__setitem__("i", step["i"] + 1))]
    layers = [(n, l) for blk in adapter(pipe).attention_blocks(unet) for n, l in blk.layers]
    for name, layer in layers:
        def pre(mod, a, kw, name=name):
            h = a[0] if a else kw["hidden_states"]
            half = h.shape[0] // 2 if args.guidance > 1 else 0  # CFG: the conditional half
            with torch.no_grad():
                maps[name, step["i"]] = self_attention_map(mod, h[half:], logit_std[name])
            ins[name, step["i"]] = h[half:].detach()
        def post(mod, a, out, name=name):
            y = out[0] if isinstance(out, tuple) else out
            outs[name, step["i"]] = y[y.shape[0] // 2 if args.guidance > 1 else 0:].detach()
        hooks.append(layer.attn1.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post))
    with torch.no_grad():
        images = pipe(prompt=[it.prompt for it in items], num_inference_steps=25, guidance_scale=args.guidance,
                      height=height, width=width, output_type="pt",
                      generator=[torch.Generator().manual_seed(it.seed) for it in items]).images
    for h in hooks:
        h.remove()
    ink_full = images.mean(1, keepdim=True)  # [B, 1, H, W] in [0, 1]; ink is bright

    g = torch.Generator().manual_seed(0)
    rows = defaultdict(lambda: defaultdict(list))
    steps = step["i"] + 1
    for (name, t), A in maps.items():
        y = outs[name, t]
        b, n, _ = A.shape
        side = math.isqrt(n)
        k = keep_count(n, args.prune_ratio)
        r = rows[name]
        r["N"] = [n]
        ent_rows = row_entropy(A)  # [B, N]
        r["entropy"].append(float(ent_rows.mean()))
        s = gwpr(A)
        keep = keep_indices(s, k)
        r["topk_mass"].append(float(s.gather(1, keep).sum(-1).mean()))
        def err(kp, y=y, A=A, src=None):  # relative change of the layer output after the refill
            kept = y.gather(1, kp.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
            src = assign_by_attention(A, kp) if src is None else src
            diff = (y - refill(kept, src)).norm(dim=(1, 2))
            return float((diff / y.norm(dim=(1, 2))).mean())

        r["refill_gwpr"].append(err(keep))
        r["refill_cosine"].append(err(keep, src=assign_by_cosine(ins[name, t], keep)))
        r["dist_gwpr"].append(_source_distance(A, keep, side))
        rand = [torch.rand(b, n, generator=g).topk(k, -1).indices.sort(-1).values
                for _ in range(args.random_draws)]
        r["refill_random"].append(sum(err(kp) for kp in rand) / len(rand))
        r["dist_random"].append(sum(_source_distance(A, kp, side) for kp in rand) / len(rand))
        ink = (F.adaptive_avg_pool2d(ink_full, side).flatten(1) > 0.5).float()  # [B, N]
        r["ink_kept"].append(float(ink.gather(1, keep).mean()))
        if ink.sum() > 0:
            r["ink_entropy"].append(float((ent_rows * ink).sum() / ink.sum()))
        bg = (1 - ink)[:, None, :]  # [B, 1, N]
        Ab = A * bg
        mass = Ab.sum(-1, keepdim=True)
        P = Ab / mass.clamp_min(1e-12)
        ent_bg = -(P.clamp_min(1e-12).log() * P).sum(-1) / bg.sum(-1).clamp_min(2).log()
        r["bg_mass"].append(float(mass.mean()))
        r["bg_entropy"].append(float(ent_bg.mean()))
        r["ink_all"].append(float(ink.mean()))
        if t > 0 and (name, t - 1) in maps:
            sp = gwpr(maps[name, t - 1])
            r["step_corr"].append(sum(_rankcorr(s[i], sp[i]) for i in range(b)) / b)

    print(f"{args.model} model, {args.prompts} prompts x {steps} steps, prune_ratio {args.prune_ratio}, "
          f"random = mean of {args.random_draws} draws\n")
    print("| layer | tokens | entropy | ink-row entropy | top-k mass (random = k/N) | refill err G-WPR | refill err random "
          "| refill err cosine | source dist G-WPR | source dist random | ink kept G-WPR | ink share (random) "
          "| step corr | bg mass | bg entropy | logit std |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    for name, _ in layers:
        r = rows[name]
        n = r["N"][0]
        k = keep_count(n, args.prune_ratio)
        print(f"| {name} | {math.isqrt(n)}x{math.isqrt(n)} | {mean(r['entropy']):.3f} | "
              f"{mean(r['ink_entropy']):.3f} | "
              f"{mean(r['topk_mass']):.3f} ({k / n:.3f}) | {mean(r['refill_gwpr']):.3f} | "
              f"{mean(r['refill_random']):.3f} | {mean(r['refill_cosine']):.3f} | "
              f"{mean(r['dist_gwpr']):.2f} | {mean(r['dist_random']):.2f} | "
              f"{mean(r['ink_kept']):.3f} | {mean(r['ink_all']):.3f} | "
              f"{mean(r['step_corr']):.3f} | {mean(r['bg_mass']):.3f} | {mean(r['bg_entropy']):.3f} | "
              f"{mean(logit_std[name]):.3f} |")
    phases = (("early (first third)", lambda t: t < steps // 3),
              ("late (last third)", lambda t: t >= steps - steps // 3))
    for ph, sel in phases:
        gw = [e for (_, t), e in _by_step(rows, maps, "refill_gwpr") if sel(t)]
        rd = [e for (_, t), e in _by_step(rows, maps, "refill_random") if sel(t)]
        cs = [e for (_, t), e in _by_step(rows, maps, "refill_cosine") if sel(t)]
        print(f"refill error, {ph} steps, all layers: G-WPR {mean(gw):.3f} / random {mean(rd):.3f}"
              f" / G-WPR with the cosine refill {mean(cs):.3f}")


def _source_distance(A: torch.Tensor, keep: torch.Tensor, side: int) -> float:
    """Mean grid distance from each pruned token to the kept token it is refilled from."""
    from edm.methods.token.atedm_kernel import assign_by_attention

    src = keep.gather(1, assign_by_attention(A, keep))  # [B, N] grid index of the source
    pos = torch.arange(A.shape[-1])
    d = torch.hypot((pos // side - src // side).float(), (pos % side - src % side).float())
    pruned = d.new_ones(d.shape, dtype=torch.bool).scatter(1, keep, False)
    return float(d[pruned].mean())


def _by_step(rows, maps, key):
    """(layer, step) -> value, from the per-layer lists filled in map order."""
    counters = defaultdict(int)
    out = []
    for (name, t) in maps:
        i = counters[name]
        counters[name] += 1
        out.append(((name, t), rows[name][key][i]))
    return out


if __name__ == "__main__":
    main()

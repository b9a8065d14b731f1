"""Which words of a layouts prompt the model uses: denoising loss with the true prompt, with every
digit word changed, with the cells swapped, and with the empty prompt (issue 14).

    python experiments/layouts_conditioning.py --checkpoint DIR [--max-objects 1] [--scenes 256]

For seeded train scenes noised to t = 100 ... 900 (one noise draw per t, the same for every
prompt variant), prints the MSE of the UNet's prediction to its target (the scheduler's
``prediction_type``). A model that follows a word has a higher loss when that word is wrong:
"wrong digit" (each digit d -> d + 3 mod 10, cells kept) tests identity, "wrong cell" (cells
reversed: top left <-> bottom right, top right <-> bottom left) tests position. Identical losses
mean the model ignores that part of the prompt -- cheaper and sharper than sampling.

``--attention``: also the share of each cross-attention layer's weight (mean over heads and
pixels, t = 600, true prompts) on the padding tokens and on the first object's digit word.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def variants(layouts: torch.Tensor) -> dict[str, torch.Tensor | None]:
    wrong_digit = torch.where(layouts >= 0, (layouts + 3) % 10, layouts)
    return {"true": layouts, "wrong digit": wrong_digit, "wrong cell": layouts[:, [3, 2, 1, 0]], "empty": None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attention", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edm.digits import DigitsLoader
    from edm.layouts.data import layout_prompt, random_layouts, render
    from edm.methods.weight.finetune import training_target

    pipe = DigitsLoader(args.checkpoint).load()
    g = torch.Generator().manual_seed(5)
    layouts = random_layouts(args.scenes, g, max_objects=args.max_objects)
    x0 = render(layouts, g) * 2 - 1
    texts = {name: pipe.text_kwargs([""] * len(x0) if lay is None else [layout_prompt(r.tolist()) for r in lay])
             for name, lay in variants(layouts).items()}
    print(f"{args.checkpoint}: {len(x0)} scenes of 1-{args.max_objects} objects, "
          f"target {pipe.scheduler.config.prediction_type}, mask_padding {pipe.config.mask_padding}")
    print("| t | " + " | ".join(texts) + " |\n|---|" + "---|" * len(texts))
    for step in (100, 300, 500, 700, 900):
        t = torch.full((len(x0),), step)
        noise = torch.randn(x0.shape, generator=g)
        a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, training_target(pipe.scheduler, x0, noise, a)
        with torch.no_grad():
            loss = [torch.nn.functional.mse_loss(pipe.unet(xt, t, **kw).sample, target).item()
                    for kw in texts.values()]
        print(f"| {step} | " + " | ".join(f"{v:.4f}" for v in loss) + " |")
    if args.attention:
        attention_shares(pipe, x0, [layout_prompt(r.tolist()) for r in layouts], g)


def attention_shares(pipe, x0, prompts: list[str], g: torch.Generator) -> None:
    """Cross-attention mass on the padding tokens and on token 2 (the first digit word:
    ``<bos> a <digit> ...``), recomputed from each attn2's own projections and mask."""
    text, shares, hooks = pipe.text_kwargs(prompts), {}, []
    is_pad = pipe._tokens(prompts).attention_mask == 0

    def hook(name):
        def f(mod, args, kwargs, out):
            q, k = mod.to_q(args[0]), mod.to_k(kwargs["encoder_hidden_states"])
            b, n, c = q.shape
            q = q.view(b, n, mod.heads, -1).transpose(1, 2)
            k = k.view(b, -1, mod.heads, c // mod.heads).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) * mod.scale
            if "encoder_attention_mask" in text:
                logits = logits.masked_fill(is_pad[:, None, None, :], float("-inf"))
            shares[name] = logits.softmax(-1).mean((1, 2))  # [B, L]
        return f

    for name, m in pipe.unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(m.register_forward_hook(hook(name), with_kwargs=True))
    t = torch.full((len(x0),), 600)
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pipe.unet(xt, t, **text)
    for hk in hooks:
        hk.remove()
    print("\n| cross-attention layer (t = 600) | padding share | first digit word share |\n|---|---|---|")
    for name, w in shares.items():
        print(f"| {name.replace('.transformer_blocks.0.attn2', '')} | {float((w * is_pad).sum(1).mean()):.3f} | "
              f"{float(w[:, 2].mean()):.3f} |")


if __name__ == "__main__":
    main()

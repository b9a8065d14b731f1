"""Measure a digits checkpoint: prompt accuracy, digit FID (and its floor), seconds per image,
and the quality left after global magnitude pruning of the transformer linears.

    python -m edm.digits.report                       # the shipped checkpoint
    python -m edm.digits.report --checkpoint DIR --sparsity 0.5 0.7

This is the README's measurement, outside the Hydra runner so it can compare several
checkpoints or sparsities in one process; ``python run.py`` reports the same metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def generate_and_evaluate(pipe, items, out_dir: Path, steps: int, cfg: float, batch_size: int) -> dict:
    """Generate ``items`` (one seeded generator each) as PNGs in ``out_dir``; evaluate them."""

    from edm.eval.base import ImageSet, image_path
    from edm.eval.digits import DigitsEval

    out_dir.mkdir(parents=True, exist_ok=True)
    warm = [torch.Generator().manual_seed(0)]
    pipe([items[0].prompt], num_inference_steps=steps, guidance_scale=cfg, generator=warm)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        gens = [torch.Generator().manual_seed(it.seed) for it in chunk]
        imgs = pipe([it.prompt for it in chunk], num_inference_steps=steps, guidance_scale=cfg,
                    generator=gens, output_type="pil").images
        for it, im in zip(chunk, imgs):
            im.save(image_path(out_dir, it.index))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = DigitsEval().evaluate(ImageSet(out_dir, items))
    scalars = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
    scalars["sec_per_image"] = round(wall / len(items), 4)
    scalars["cpu_sec_per_image"] = round(cpu / len(items), 4)
    return scalars


def global_magnitude_prune(unet, sparsity: float) -> float:
    """Zero the globally smallest |W| over the transformer linears (attn + ff); returns sparsity."""
    from edm.families import adapter

    layers = [m for unit in adapter("digits").linear_units(unet, groups=("attn", "ff")) for _, m in unit]
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    k = int(sparsity * scores.numel())
    if k == 0:
        return 0.0
    threshold = scores.kthvalue(k).values
    zeros = 0
    with torch.no_grad():
        for m in layers:
            m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
            zeros += int((m.weight == 0).sum())
    return zeros / scores.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: shipped)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, nargs="*", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="per-prompt seed = seed * 1_000_003 + index")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)

    from edm.data.digits import DigitPrompts
    from edm.digits.loader import DigitsLoader
    from edm.eval.base import PromptItem

    items = [PromptItem(it.index, it.prompt, a.seed * 1_000_003 + it.index, it.meta)
             for it in DigitPrompts(a.num_prompts).load()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sp in [0.0, *a.sparsity]:
            pipe = DigitsLoader(a.checkpoint).load("digits", "fp32", "cpu")
            measured = global_magnitude_prune(pipe.unet, sp) if sp > 0 else 0.0
            res = generate_and_evaluate(pipe, items, Path(tmp) / f"s{sp}", a.steps,
                                        a.guidance_scale, a.batch_size)
            res["sparsity"] = round(measured, 4)
            results[str(sp)] = res
            log.info("sparsity %.2f: %s", sp, json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

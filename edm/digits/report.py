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
    """Generate ``items`` as PNGs in ``out_dir`` with the runner's generation loop (per-item
    seeds, atomic writes, untimed warm-up batch) and evaluate them."""
    from edm.data.images import ImageSet
    from edm.eval.digits import DigitsEval
    from edm.generate import generate

    gen = {"num_inference_steps": steps, "guidance_scale": cfg, "height": 16, "width": 16,
           "batch_size": batch_size}
    c0 = time.process_time()
    stats = generate(pipe, items, gen, out_dir, torch.device("cpu"), progress=False)
    cpu = time.process_time() - c0
    res = DigitsEval().evaluate(ImageSet(out_dir, items))
    scalars = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
    timed = stats.sec_per_image  # None when everything fit in the warm-up batch
    scalars["sec_per_image"] = round(timed, 4) if timed is not None else None
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
    p.add_argument("--seed", type=int, default=0, help="run seed (per-prompt seeds as the runner)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)

    from edm.data.digits import DigitPrompts
    from edm.data.prompts import assign_seeds
    from edm.digits.loader import DigitsLoader

    items = assign_seeds(DigitPrompts(a.num_prompts).load(), a.seed)
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

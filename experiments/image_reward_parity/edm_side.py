"""edm half of the ImageReward parity check; runs in the project env (transformers 5, timm >= 1).

Scores WORK's images with ``edm.eval.image_reward.ImageReward`` exactly as a run would (files
resolved from the offline hub cache in WORK/hf, images read through an ``ImageSet``) and compares
with upstream.json. Exit status 1 if any |edm - upstream| > TOL or a token id differs.
"""

import json
import os
import sys
from pathlib import Path

WORK = Path(sys.argv[1])
TOL = 1e-5
os.environ["HF_HOME"] = str(WORK / "hf")  # before huggingface_hub is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from edm.eval.base import ImageSet, PromptItem
from edm.eval.image_reward import ImageReward
from edm.eval.image_reward_model import MAX_TEXT_LEN


def main() -> int:
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    up = json.loads((WORK / "upstream.json").read_text())
    prompts = json.loads((WORK / "prompts.json").read_text())
    images = ImageSet(WORK / "images", [PromptItem(i, p) for i, p in enumerate(prompts)])

    ev = ImageReward(device="cpu", batch_size=4)  # default: THUDM/ImageReward + bert-base-uncased
    ev.check()
    res = ev.evaluate(images)
    ours = res["image_reward_per_image"]
    scorer = ev.scorer()
    ranked = scorer.score([prompts[0]] * 3, images.paths[:3])
    ids = scorer.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LEN
    )["input_ids"]

    diffs = [abs(a - b) for a, b in zip(ours, up["scores"])]
    diffs_rank = [abs(a - b) for a, b in zip(ranked, up["rank_prompt0_images012"])]
    ids_equal = [list(a) == list(b) for a, b in zip(ids, up["input_ids"])]
    spread = max(up["scores"]) - min(up["scores"])
    print(
        f"edm: transformers/timm/setuptools = {_versions()}; checkpoint keys loaded "
        f"{len(scorer.model.state_dict())}, unused {scorer.model.unused_keys}"
    )
    print("edm scores:     ", " ".join(f"{s:+.6f}" for s in ours))
    print("upstream scores:", " ".join(f"{s:+.6f}" for s in up["scores"]))
    print(f"max |edm - upstream| per-image = {max(diffs):.3e} (spread of scores {spread:.3f})")
    print(f"max |edm - upstream| batch of 3 vs inference_rank = {max(diffs_rank):.3e}")
    print(f"token ids identical for {sum(ids_equal)}/{len(ids_equal)} prompts")
    ok = max(diffs + diffs_rank) <= TOL and all(ids_equal)
    print(f"PARITY {'PASS' if ok else 'FAIL'} (tolerance {TOL:g})")
    return 0 if ok else 1


def _versions() -> str:
    from importlib.metadata import version

    return "/".join(version(p) for p in ("transformers", "timm", "setuptools"))


if __name__ == "__main__":
    sys.exit(main())

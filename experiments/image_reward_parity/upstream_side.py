"""Upstream half of the ImageReward parity check; runs in the isolated env (image-reward==1.5).

Writes into WORK (argv[1]):
  hf/hub/...              an offline Hugging Face cache holding a small bert-base-uncased
                          vocabulary (repo ``bert-base-uncased``) and the checkpoint and
                          med_config (repo ``THUDM/ImageReward``): both sides resolve files
                          the real way;
  images/000000.png ...   test images of several sizes/modes (the edm ImageSet layout);
  prompts.json            one prompt per image;
  upstream.json           upstream rewards (score() per image, inference_rank()), token ids.

The checkpoint is the state dict of upstream's own ``ImageReward`` module (the official key layout,
``blip.*`` + ``mlp.*``) with seeded random weights; LayerNorm affine parameters and biases are
perturbed and the reward head is rescaled so every part of the network moves the scores.
It is then loaded exactly as ``ImageReward.load`` does (``load_state_dict(strict=False)``,
``eval()``).
"""

import hashlib
import json
import os
import string
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORK = Path(sys.argv[1])
SNAP = "0" * 40  # fake commit hash of the cached snapshots

PROMPTS = [
    "A cat sitting on a red couch.",
    "two dogs playing in the snow",
    "A bowl of fruit, apples and bananas, on a wooden table",
    "a man riding a zyzzyva-shaped surfboard",  # out-of-vocabulary word -> WordPieces
    "Street sign at the corner of a busy city road at night",
    "a very long caption " + " ".join(["with many repeated words about a kitchen"] * 8),
    "",  # empty prompt: only [CLS] [SEP]
    "An ELEPHANT standing near a river; birds flying above.",
]
WORDS = sorted(
    {
        w
        for p in PROMPTS
        for w in p.lower().replace(".", " ").replace(",", " ").replace(";", " ").split()
        if w != "zyzzyva-shaped"
    }
)


def write_cache_file(repo: str, name: str, data: bytes) -> Path:
    root = WORK / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAP)
    path = root / "snapshots" / SNAP / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase) + list(".,;-'")
    tokens = specials + chars + ["##" + c for c in string.ascii_lowercase] + WORDS[:-3]
    return list(dict.fromkeys(tokens))  # unique, order kept (the last 3 words go to WordPieces)


def make_images(n: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [
        (512, 512),
        (640, 480),
        (300, 500),
        (224, 224),
        (1024, 768),
        (97, 131),
        (512, 512),
        (256, 256),
    ]
    (WORK / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(7 * xx + i), np.cos(5 * yy - i), xx * yy], -1)
        arr = np.clip(127 + 100 * base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if i == 5:
            img = img.convert("L")  # grayscale file: upstream converts to RGB after the crop
        img.save(WORK / "images" / f"{i:06d}.png")


def randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mlp.") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    vocab = make_vocab()
    write_cache_file("bert-base-uncased", "vocab.txt", ("\n".join(vocab) + "\n").encode())
    write_cache_file(
        "bert-base-uncased",
        "tokenizer_config.json",
        json.dumps({"do_lower_case": True, "model_max_length": 512}).encode(),
    )
    write_cache_file(
        "bert-base-uncased", "config.json", json.dumps({"model_type": "bert"}).encode()
    )
    # The released med_config.json with vocab_size = this vocabulary + [DEC] + [ENC].
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    med_path = write_cache_file(
        "THUDM/ImageReward", "med_config.json", json.dumps(med, indent=2).encode()
    )
    make_images(len(PROMPTS))
    (WORK / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))

    import ImageReward as RM  # noqa: F401  (the package import must work in this env)
    from ImageReward.ImageReward import ImageReward as UpstreamImageReward

    src = UpstreamImageReward(med_config=str(med_path), device="cpu")
    randomize(src)
    ckpt = write_cache_file("THUDM/ImageReward", "ImageReward.pt", b"")
    torch.save(src.state_dict(), ckpt)
    del src

    # As ImageReward.load(path): build, load_state_dict(strict=False), eval().
    model = UpstreamImageReward(med_config=str(med_path), device="cpu")
    msg = model.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=False)
    model.eval()
    paths = [str(WORK / "images" / f"{i:06d}.png") for i in range(len(PROMPTS))]
    with torch.no_grad():
        per_image = [model.score(p, path) for p, path in zip(PROMPTS, paths)]
        _, ranked = model.inference_rank(PROMPTS[0], paths[:3])
    tok = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    sd = torch.load(ckpt, map_location="cpu")
    out = {
        "scores": per_image,
        "rank_prompt0_images012": ranked,
        "input_ids": tok["input_ids"],
        "missing_keys": msg.missing_keys,
        "unexpected_keys": msg.unexpected_keys,
        "checkpoint_keys": len(sd),
        "checkpoint_params": int(sum(v.numel() for v in sd.values())),
        "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "key_prefixes": sorted({".".join(k.split(".")[:2]) for k in sd}),
    }
    (WORK / "upstream.json").write_text(json.dumps(out, indent=1))
    print(
        f"upstream: {len(sd)} checkpoint keys, {out['checkpoint_params']:,} values, "
        f"prefixes {out['key_prefixes']}"
    )
    print(f"upstream: load_state_dict missing={msg.missing_keys} unexpected={msg.unexpected_keys}")
    print("upstream scores:", " ".join(f"{s:+.6f}" for s in per_image))


if __name__ == "__main__":
    main()

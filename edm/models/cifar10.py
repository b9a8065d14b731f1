"""CIFAR-10 from the official python batches (``cifar-10-python.tar.gz``), without torchvision.

Used twice for OBS-Diff's Table 10: the training split fine-tunes Diff-Pruning's pruned DDPM
UNet (``model=ddpm_cifar10``'s ``train_data()``), and it is the FID reference (Diff-Pruning and
DDPM compare 50 K samples with the 50 K training images): ``python -m edm.eval.precompute
eval=fid_cifar10`` unpacks it to PNGs once with :func:`export_pngs`.

The folder is the extracted ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``,
``test_batch``): pickled dicts whose ``b"data"`` is uint8 ``[10000, 3072]`` in CHW order.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from edm.errors import ConfigError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FETCH = (f"fetch it once: curl -LO {URL} && tar xzf cifar-10-python.tar.gz "
         "(it extracts cifar-10-batches-py/)")
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def is_cifar10_dir(folder: str | os.PathLike | None) -> bool:
    return folder is not None and all((Path(folder) / b).is_file() for b in SPLITS["train"])


def check_cifar10(folder: str | os.PathLike | None, key: str, split: str = "train") -> Path:
    """The batches folder, or a ConfigError naming ``key`` and how to get the data."""
    if split not in SPLITS:
        raise ConfigError(key, f"unknown CIFAR-10 split {split!r}.", list(SPLITS))
    if not folder:
        raise ConfigError(key, f"is not set; point it at the extracted cifar-10-batches-py "
                          f"folder ({key}=/data/cifar-10-batches-py), or {FETCH}.")
    missing = [b for b in SPLITS[split] if not (Path(folder).expanduser() / b).is_file()]
    if missing:
        raise ConfigError(key, f"{folder} lacks {', '.join(missing)}: not the extracted "
                          f"cifar-10-batches-py folder; {FETCH}.")
    return Path(folder).expanduser()


def read_cifar10(folder: str | os.PathLike, split: str = "train",
                 key: str = "model.loader.train_data_dir") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``) of ``split`` (50 000 train)."""
    root = check_cifar10(folder, key, split)
    images, labels = [], []
    for name in SPLITS[split]:
        with open(root / name, "rb") as f:
            # the dataset's own format (pickled dicts of numpy arrays, bytes keys); a local file
            # the user points at, as torchvision reads it
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def export_pngs(folder: str | os.PathLike, out_dir: str | os.PathLike, split: str = "train",
                key: str = "eval.fid.reference_images") -> Path:
    """Write ``split`` as ``out_dir/000000.png ...`` once (skipped when all files exist)."""
    from PIL import Image

    images, _ = read_cifar10(folder, split, key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / ".complete"
    if done.is_file() and done.read_text().strip() == str(len(images)):
        return out
    for i, img in enumerate(images):
        path = out / f"{i:06d}.png"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")  # not *.png: never read as an image
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(tmp, format="PNG")
            os.replace(tmp, path)  # a killed export never leaves a truncated PNG
    done.write_text(str(len(images)))
    return out

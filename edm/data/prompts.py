"""Prompt sets for generation: COCO captions, a plain prompts file, a small built-in list.

Every set is a Hydra target with ``check()`` (cheap; raises :class:`ConfigError` naming the key,
before any model is loaded) and ``load() -> list[PromptItem]``. Selection is deterministic, so
every method and every shard sees the same prompt at the same index.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from edm.data.images import PromptItem
from edm.errors import ConfigError


def _check_num(key: str, n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise ConfigError(key, f"must be a positive integer or null, got {n!r}.")


class CocoCaptions:
    """One caption per image from the official ``annotations/captions_<split><year>.json``.

    Args:
        root: COCO folder holding ``annotations/`` (and ``<split><year>/`` images for FID).
        year: ``2014`` (OBS-Diff protocol) or ``2017`` (AT-EDM protocol).
        split: ``val`` (default) or ``train``.
        num_prompts: how many images/captions; ``null`` = all (40 504 for val2014, 5 000 for val2017).
        selection_seed: images are sorted by id and shuffled with this seed before taking the
            first ``num_prompts``; the caption is the image's lowest-id annotation. Fixed so that
            every run of a table sees the same prompts.
    """

    def __init__(self, root: str | None, year: int = 2014, split: str = "val",
                 num_prompts: int | None = 5000, selection_seed: int = 0, name: str = "coco"):
        self.root, self.year, self.split = root, int(year), split
        self.num_prompts, self.selection_seed, self.name = num_prompts, selection_seed, name

    @property
    def annotation_file(self) -> Path:
        return Path(self.root) / "annotations" / f"captions_{self.split}{self.year}.json"

    @property
    def images_dir(self) -> Path:
        return Path(self.root) / f"{self.split}{self.year}"

    def check(self) -> None:
        if self.year not in (2014, 2017):
            raise ConfigError("data.year", f"unsupported COCO year {self.year}.", [2014, 2017])
        if self.split not in ("val", "train"):
            raise ConfigError("data.split", f"unsupported split {self.split!r}.", ["val", "train"])
        _check_num("data.num_prompts", self.num_prompts)
        if not self.root:
            raise ConfigError(
                "data.root", "is not set; point it at your COCO folder, e.g. data.root=/data/coco "
                f"(it must contain annotations/captions_{self.split}{self.year}.json)."
            )
        if not self.annotation_file.is_file():
            raise ConfigError(
                "data.root", f"{self.annotation_file} does not exist; download the COCO "
                f"{self.year} annotations (annotations_trainval{self.year}.zip) and unzip them there."
            )

    def load(self) -> list[PromptItem]:
        self.check()
        ann = json.loads(self.annotation_file.read_text())
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        first: dict[int, tuple[int, str]] = {}
        for a in ann["annotations"]:
            cur = first.get(a["image_id"])
            if cur is None or a["id"] < cur[0]:
                first[a["image_id"]] = (a["id"], a["caption"].strip())
        image_ids = sorted(first)
        random.Random(self.selection_seed).shuffle(image_ids)
        if self.num_prompts is not None:
            if self.num_prompts > len(image_ids):
                raise ConfigError(
                    "data.num_prompts", f"{self.num_prompts} exceeds the {len(image_ids)} images."
                )
            image_ids = image_ids[: self.num_prompts]
        return [
            PromptItem(i, " ".join(first[img][1].split()),
                       meta={"image_id": img, "file_name": files.get(img)})
            for i, img in enumerate(image_ids)
        ]


class PromptsFile:
    """One prompt per line (blank lines and ``#`` comments skipped).

    Args:
        path: the text file.
        num_prompts: keep the first N; ``null`` = all.
    """

    def __init__(self, path: str | None, num_prompts: int | None = None, name: str = "prompts"):
        self.path, self.num_prompts, self.name = path, num_prompts, name

    def check(self) -> None:
        _check_num("data.num_prompts", self.num_prompts)
        if not self.path or not Path(self.path).is_file():
            raise ConfigError("data.path", f"prompts file {self.path!r} does not exist.")

    def load(self) -> list[PromptItem]:
        self.check()
        lines = [ln.strip() for ln in Path(self.path).read_text().splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        return [PromptItem(i, p) for i, p in enumerate(prompts[: self.num_prompts])]


# A handful of COCO-style captions for smoke runs of real and tiny models without data.
BUILTIN = [
    "a photograph of an astronaut riding a horse",
    "a red double-decker bus driving down a city street",
    "a bowl of fruit on a wooden kitchen table",
    "two cats sleeping on a couch next to a remote control",
    "a man surfing a large wave in the ocean",
    "a snowy mountain range at sunrise",
    "a plate with a sandwich and french fries",
    "a giraffe standing next to a tree in a zoo",
    "a living room with a fireplace and a large window",
    "a train stopped at a station platform",
    "a dog catching a frisbee in a park",
    "a vase of sunflowers on a windowsill",
    "a stop sign on the corner of a quiet street",
    "a sailboat on a calm lake at sunset",
    "a laptop and a cup of coffee on a desk",
    "a group of people flying kites on a beach",
]


class BuiltinPrompts:
    """The built-in list above (16 prompts, cycled if ``num_prompts`` is larger)."""

    def __init__(self, num_prompts: int = 8, name: str = "builtin"):
        self.num_prompts, self.name = num_prompts, name

    def check(self) -> None:
        _check_num("data.num_prompts", self.num_prompts)

    def load(self) -> list[PromptItem]:
        self.check()
        return [PromptItem(i, BUILTIN[i % len(BUILTIN)]) for i in range(self.num_prompts)]


def assign_seeds(items: list[PromptItem], seed: int) -> list[PromptItem]:
    """Per-prompt seeds: ``seed * 1_000_003 + index`` (same prompt => same noise under every method)."""
    return [PromptItem(it.index, it.prompt, seed * 1_000_003 + it.index, it.meta) for it in items]


def shard(items: list[PromptItem], shard_id: int, num_shards: int) -> list[PromptItem]:
    """Deterministic, disjoint shards (round-robin by position) whose union is ``items``."""
    if num_shards < 1:
        raise ConfigError("gen.num_shards", f"must be >= 1, got {num_shards}.")
    if not 0 <= shard_id < num_shards:
        raise ConfigError("gen.shard", f"must be in [0, {num_shards - 1}], got {shard_id}.")
    return items[shard_id::num_shards]

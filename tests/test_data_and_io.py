"""Prompt sets, sharding, seeds, atomic writes and resumable generation (with a fake pipeline)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from edm.data.prompts import BuiltinPrompts, CocoCaptions, PromptsFile, assign_seeds, shard
from edm.errors import ConfigError
from edm.eval.base import ImageSet, PromptItem, image_path
from edm.generate import generate
from edm.io import write_json


def _coco_fixture(root, year=2014):
    (root / "annotations").mkdir(parents=True)
    images = [{"id": i, "file_name": f"COCO_val{year}_{i:012d}.jpg"} for i in (5, 3, 9, 1)]
    anns = []
    for k, im in enumerate(images):
        # two captions per image; the lower annotation id must win
        anns.append({"id": 100 + k, "image_id": im["id"], "caption": f"second {im['id']}"})
        anns.append({"id": 10 + k, "image_id": im["id"], "caption": f"  first  caption {im['id']} "})
    (root / "annotations" / f"captions_val{year}.json").write_text(
        json.dumps({"images": images, "annotations": anns}))
    return root


def test_coco_one_caption_per_image_deterministic(tmp_path):
    root = _coco_fixture(tmp_path / "coco")
    a = CocoCaptions(str(root), 2014, num_prompts=3).load()
    b = CocoCaptions(str(root), 2014, num_prompts=3).load()
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.index for x in a] == [0, 1, 2]
    assert all(x.prompt.startswith("first caption") for x in a)
    assert len({x.meta["image_id"] for x in a}) == 3
    other = CocoCaptions(str(root), 2014, num_prompts=4, selection_seed=1).load()
    assert sorted(x.meta["image_id"] for x in other) == [1, 3, 5, 9]


def test_coco_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        CocoCaptions(None, 2014).check()
    with pytest.raises(ConfigError, match="data.root"):
        CocoCaptions(str(tmp_path), 2017).check()
    with pytest.raises(ConfigError, match="data.year.*Allowed: 2014, 2017"):
        CocoCaptions(str(tmp_path), 2015).check()
    root = _coco_fixture(tmp_path / "coco")
    with pytest.raises(ConfigError, match="data.num_prompts"):
        CocoCaptions(str(root), 2014, num_prompts=50).load()


def test_prompts_file_and_builtin(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\na cat\n\na dog\na bird\n")
    assert [x.prompt for x in PromptsFile(str(p)).load()] == ["a cat", "a dog", "a bird"]
    assert len(PromptsFile(str(p), num_prompts=2).load()) == 2
    with pytest.raises(ConfigError, match="data.path"):
        PromptsFile(str(tmp_path / "nope.txt")).check()
    assert len(BuiltinPrompts(20).load()) == 20


def test_seeds_and_shards_partition():
    items = assign_seeds([PromptItem(i, f"p{i}") for i in range(10)], seed=3)
    assert items[4].seed == 3 * 1_000_003 + 4
    shards = [shard(items, k, 3) for k in range(3)]
    assert sorted(i.index for s in shards for i in s) == list(range(10))
    with pytest.raises(ConfigError, match="gen.shard"):
        shard(items, 3, 3)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


class FakePipe:
    """Honours the pipeline contract; image = function of the per-item generator only."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, prompt, generator, height, width, output_type, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        imgs = torch.stack([torch.rand(3, height, width, generator=g) for g in generator])
        return SimpleNamespace(images=imgs)


GEN = dict(num_inference_steps=2, guidance_scale=1.0, height=8, width=8, batch_size=2)


def test_generation_resumes_after_kill_and_is_seed_stable(tmp_path):
    items = assign_seeds([PromptItem(i, f"p{i}") for i in range(5)], seed=0)
    out = tmp_path / "imgs"
    with pytest.raises(KeyboardInterrupt):
        generate(FakePipe(fail_after=2), items, GEN, out, torch.device("cpu"), progress=False)
    done = sorted(p.name for p in out.iterdir())
    assert done == ["000000.png", "000001.png", "000002.png", "000003.png"]  # no temp files
    before = {n: (out / n).read_bytes() for n in done}
    pipe = FakePipe()
    stats = generate(pipe, items, GEN, out, torch.device("cpu"), progress=False)
    assert (stats.generated, stats.skipped, pipe.calls) == (1, 4, 1)
    assert all((out / n).read_bytes() == b for n, b in before.items())
    # a fresh unsharded run and the union of shards give identical files
    ref = tmp_path / "ref"
    generate(FakePipe(), items, GEN, ref, torch.device("cpu"), progress=False)
    for it in items:
        assert image_path(ref, it.index).read_bytes() == image_path(out, it.index).read_bytes()
    assert ImageSet(ref, items).missing() == []
    batch, its = next(ImageSet(ref, items).iter_batches(4))
    assert batch.shape == (4, 3, 8, 8) and batch.dtype == torch.uint8 and len(its) == 4

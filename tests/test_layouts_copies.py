"""The copies experiment of issue 14: scenes whose same-class digits are one image, and the
``copy_err`` metric that scores whether a model reproduces that long-range dependency."""

import pytest
import torch

from edm.layouts import data


def test_repeat_digits_makes_whole_scenes_one_class_and_keeps_empty_cells():
    g = torch.Generator().manual_seed(0)
    lay = data.random_layouts(400, g)
    rep = data.repeat_digits(lay, g, 0.5)
    assert torch.equal(rep == data.EMPTY, lay == data.EMPTY)
    one_class = torch.tensor([len({v for v in row if v != data.EMPTY}) == 1 for row in rep.tolist()])
    multi = (lay != data.EMPTY).sum(1) > 1
    changed = (rep != lay).any(1)
    assert 0.35 < one_class[multi].float().mean() < 0.75  # ~half (plus chance repeats)
    assert one_class[changed].all()
    assert torch.equal(data.repeat_digits(lay, torch.Generator(), 0.0), lay)


def test_copies_render_draws_one_image_per_class_and_changes_nothing_else():
    from edm.eval.layouts import copy_error, same_digit_pairs

    lay = torch.tensor([[3, -1, 3, 3], [5, 1, -1, 2], [7, 7, -1, -1]])
    pairs = same_digit_pairs(lay)
    assert pairs.tolist() == [[0, 0, 2], [0, 0, 3], [0, 2, 3], [2, 0, 1]]
    copies = data.render(lay, torch.Generator().manual_seed(4), copies=True)
    plain = data.render(lay, torch.Generator().manual_seed(4))
    assert copy_error(copies, pairs) == 0.0  # the same image at another offset: exact at the best shift
    assert copy_error(plain, pairs) > 0.02  # two random sevens differ
    cells_c, cells_p = data.cell_crops(copies).view(3, 4, 16, 16), data.cell_crops(plain).view(3, 4, 16, 16)
    assert torch.equal(cells_c[1], cells_p[1])  # no repeated class: identical to the plain render
    assert torch.equal(cells_c[:, 0], cells_p[:, 0])  # the first instance of a class is the plain one


def test_copy_error_sees_a_shifted_copy_as_equal_and_a_blank_cell_as_different():
    from edm.eval.layouts import copy_error

    img = torch.zeros(1, 1, 32, 32)
    digit = data.cell_digits("train")[0][0]
    img[0, 0, 1:13, 2:14] = digit
    img[0, 0, 19:31, 16:28] = digit  # bottom right, another offset inside its cell
    pair = torch.tensor([[0, 0, 3]])
    assert copy_error(img, pair) == pytest.approx(0.0, abs=1e-7)
    img[0, 0, 16:, 16:] = 0
    # against a blank cell the best shift can only push some ink out of the cell (zero fill)
    assert 0.3 * float(digit.sum()) / 256 < copy_error(img, pair) <= float(digit.sum()) / 256


def test_layout_prompts_repeat_knob_changes_only_repeated_items_and_checks_its_range():
    from edm.data.layouts import LayoutPrompts
    from edm.errors import ConfigError

    base, rep = LayoutPrompts(num_prompts=40).load(), LayoutPrompts(num_prompts=40, repeat=1.0).load()
    for a, b in zip(base, rep):
        la, lb = a.meta["layout"], b.meta["layout"]
        assert [v == -1 for v in la] == [v == -1 for v in lb]
        assert len({v for v in lb if v != -1}) == 1
        assert lb[next(i for i, v in enumerate(la) if v != -1)] == next(v for v in la if v != -1)
    assert [it.prompt for it in LayoutPrompts(num_prompts=40, repeat=0.0).load()] == [it.prompt for it in base]
    with pytest.raises(ConfigError, match="data.repeat"):
        LayoutPrompts(repeat=1.5)


def test_copies_training_flag_changes_the_batches_and_stays_deterministic():
    from edm.layouts.train import batch

    def draw(copies):
        return batch(8, torch.Generator().manual_seed(0), 0.0, copies=copies)

    x0, p0 = draw(0.0)
    x1, p1 = draw(1.0)
    assert torch.equal(x1, draw(1.0)[0]) and p1 == draw(1.0)[1]
    assert not torch.equal(x0, x1)
    for prompt in p1:  # every scene names one digit word only
        words = {w for w in prompt.split() if w in ("zero one two three four five six seven eight nine").split()}
        assert len(words) == 1


def test_qk_init_scale_multiplies_only_self_attention_logits():
    from edm.digits.components import build_components
    from edm.layouts.components import default_config
    from edm.layouts.train import scale_self_attention_qk

    unet = build_components(default_config(), seed=0)["unet"]
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    h = torch.randn(1, 16, attn.attn1.to_q.in_features)

    def logits(a):
        return a.to_q(h) @ a.to_k(h).transpose(-1, -2)

    before, cross = logits(attn.attn1), attn.attn2.to_q.weight.clone()
    assert scale_self_attention_qk(unet, 3.0) == 7  # every pruning layer of the layouts UNet
    torch.testing.assert_close(logits(attn.attn1), before * 9)
    assert torch.equal(attn.attn2.to_q.weight, cross)  # cross-attention untouched


def test_fine_tuning_data_follows_the_checkpoints_recipe(tmp_path):
    """Diff-Pruning's data (``LayoutsLoader.train_data``) is drawn as the checkpoint was trained:
    copies for a copies checkpoint; no recorded ``copies`` = the independent digits as before."""
    import json
    from pathlib import Path

    from edm.eval.layouts import copy_error, same_digit_pairs
    from edm.layouts import LayoutsLoader

    qk3 = LayoutsLoader().check()  # the shipped checkpoint, trained with --copies 0.5
    plain = Path(__file__).resolve().parents[1] / "experiments/checkpoints/layouts_flat"
    assert "copies" not in json.loads((plain / "config.json").read_text())["train"]  # from before the knob

    def draw(ckpt):
        g = torch.Generator().manual_seed(0)  # what train_data draws, written out
        lay = data.random_layouts(64, g)
        return lay, g, LayoutsLoader(str(ckpt)).train_data(scenes=64)

    lay, g, (x, prompts) = draw(plain)
    assert torch.equal(x, data.render(lay, g, "train"))
    assert prompts == [data.layout_prompt(r.tolist()) for r in lay]
    lay, g, (xc, prompts_c) = draw(qk3)
    rep = data.repeat_digits(lay, g, 0.5)
    assert prompts_c == [data.layout_prompt(r.tolist()) for r in rep] != prompts
    pairs = same_digit_pairs(rep)
    assert len(pairs) > 20 and copy_error(xc, pairs) == 0.0  # every same-class pair an exact copy


@pytest.mark.parametrize("bad", [["--copies", "1.5"], ["--copies", "-0.1"], ["--qk-init-scale", "0"]])
def test_train_cli_rejects_out_of_range_copies_and_qk_scale(bad, capsys):
    from edm.layouts.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "x", *bad])
    assert bad[0] in capsys.readouterr().err


def test_shipped_checkpoint_has_peaked_self_attention_and_the_flat_one_does_not():
    """The shipped model was trained for sharper maps (layouts_premeasure.md): the first 32x32
    self-attention's row entropy on a real noisy scene, vs the model shipped before it."""
    from pathlib import Path

    from edm.eval.attention_stats import row_entropy, self_attention_map
    from edm.layouts import LayoutsLoader

    root = Path(__file__).resolve().parents[1]
    lay = data.random_layouts(2, torch.Generator().manual_seed(0))
    x0 = data.render(lay, torch.Generator().manual_seed(1)) * 2 - 1
    prompts = [data.layout_prompt(row.tolist()) for row in lay]
    entropy = {}
    for name, ckpt in (("shipped", None), ("flat", root / "experiments/checkpoints/layouts_flat")):
        pipe = LayoutsLoader(str(ckpt) if ckpt else None).load()
        attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        seen = {}

        def grab(mod, a, kw, seen=seen):
            seen.setdefault("h", a[0] if a else kw["hidden_states"])

        hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
        ids = pipe.tokenizer(prompts, padding="max_length", return_tensors="pt")
        t = torch.full((2,), 500)
        xt = 0.5 ** 0.5 * x0 + 0.5 ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            pipe.unet(xt, t, encoder_hidden_states=pipe.text_encoder(ids.input_ids)[0])
            hook.remove()
            entropy[name] = float(row_entropy(self_attention_map(attn, seen["h"])).mean())
    assert entropy["shipped"] < 0.92 and entropy["flat"] > 0.95, entropy  # measured 0.845 / 0.973

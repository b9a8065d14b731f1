"""Model zoo: tiny pipelines through their configs, offline tokenizer, pre-flight, real sizes."""

import json
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.flops import count_params
from edm.families import adapter
from edm.models import archs
from edm.models.tiny import TinyPipeline, tiny_sd3, tiny_sd15, tiny_sdxl
from edm.models.tokenizers import VOCAB_SIZE, clip_tokenizer
from edm.models.zoo import FullSizePipeline, HubPipeline

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
HUB_MODELS = ["sd15", "sd21", "sdxl", "sd3_medium", "sd35_medium", "sd35_large", "flux_dev",
              "flux_schnell"]



def _model_cfg(name):
    return OmegaConf.load(CONF / f"{name}.yaml")


# -- tiny pipelines --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl", "tiny_sd3"])
def test_tiny_pipeline_runs_two_steps_from_its_config(name):
    cfg = _model_cfg(name)
    loader = instantiate(cfg.loader)
    loader.check()
    pipe = loader.load(family=cfg.family, dtype=torch.float32, device="cpu")
    assert pipe.edm_family == cfg.family
    denoiser = adapter(pipe).denoiser(pipe)
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda m, a: calls.append(1))
    h, w = cfg.gen.height, cfg.gen.width
    out = pipe(
        prompt=["a red cube", "a blue sphere"],
        num_inference_steps=2,
        guidance_scale=cfg.gen.guidance_scale,
        height=h,
        width=w,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="pt",
    )
    handle.remove()
    img = out.images
    assert img.shape == (2, 3, h, w)
    assert img.dtype == torch.float32 and 0.0 <= img.min() and img.max() <= 1.0
    assert torch.isfinite(img).all()
    assert len(calls) == 2  # one denoiser call per step, CFG halves batched


def test_tiny_construction_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_sd15(seed=0), tiny_sd15(seed=0), tiny_sd15(seed=1)
    assert torch.equal(torch.rand(3), before)
    sa, sb, sc = (p.unet.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_structures_are_faithful():
    from diffusers.models.attention import BasicTransformerBlock

    sd15 = tiny_sd15().unet
    cross = [b for b in sd15.down_blocks if hasattr(b, "attentions")]
    assert len(cross) == 2 and not hasattr(sd15.down_blocks[-1], "attentions")
    assert len(sd15.mid_block.attentions) == 1
    assert all(
        isinstance(b, BasicTransformerBlock) for b in cross[0].attentions[0].transformer_blocks
    )

    sdxl = tiny_sdxl()
    unet = sdxl.unet
    assert not hasattr(unet.down_blocks[0], "attentions")  # no attention at the highest resolution
    assert unet.config.addition_embed_type == "text_time"
    layers = [
        len(a.transformer_blocks)
        for blk in adapter("sdxl").attention_blocks(unet)
        for a in [blk.module]
    ]
    assert max(layers) > 1 and min(layers) > 1
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2.pad_token == "!"

    sd3 = tiny_sd3()
    blocks = sd3.transformer.transformer_blocks
    assert sd3.text_encoder_3 is None and len(blocks) >= 2
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
    names = {n for n, _ in sd3.transformer.named_modules()}
    assert {
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff_context.net.2",
    } <= names
    sd35 = tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))
    assert sd35.transformer.transformer_blocks[0].attn2 is not None


def test_tiny_loader_validates_at_instantiation():
    with pytest.raises(ConfigError, match="model.loader.kind"):
        TinyPipeline(kind="sd4")
    with pytest.raises(ConfigError, match="model.loader"):
        TinyPipeline(kind="sd15", num_layers=3)  # only tiny_sd3 takes num_layers
    with pytest.raises(ConfigError, match="model.loader.scheduler"):
        TinyPipeline(kind="sd15", scheduler="NoSuchScheduler")
    pipe = TinyPipeline(kind="sd15", scheduler="EulerDiscreteScheduler").load(
        "sd15", "fp32", "cpu"
    )
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


# -- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("via_files", [False, True])
def test_offline_clip_tokenizer_matches_open_clip(via_files):
    open_clip = pytest.importorskip("open_clip")
    tok = clip_tokenizer(via_files=via_files)
    assert len(tok) == VOCAB_SIZE == 49408 and tok.model_max_length == 77
    texts = [
        "a photograph of an astronaut riding a horse",
        "Hello, World! It's 3.14 o'clock, isn't it?",
        "a handwritten digit seven",
        "an oil painting of a lighthouse at dusk, trending on artstation, 4k",
        "",
    ]
    ours = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = open_clip.get_tokenizer("ViT-L-14")(texts)  # pads with 0
    ids = ours.input_ids
    assert ids.shape == ref.shape == (len(texts), 77)
    real = ref != 0
    assert torch.equal(ids[real], ref[real])
    assert (ids[~real] == tok.pad_token_id).all()
    # a long prompt truncates to 77 with EOS last, as the pipelines need
    long = tok(["word " * 200], padding="max_length", truncation=True).input_ids[0]
    assert len(long) == 77 and long[-1] == VOCAB_SIZE - 1


# -- hub loader pre-flight -------------------------------------------------------------------


def test_hub_check_fails_fast_naming_the_repo():
    loader = HubPipeline(repo_id="edm-tests/not-a-cached-model", gated=True)
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        loader.check()
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert "edm-tests/not-a-cached-model" in msg
    assert "hf download edm-tests/not-a-cached-model" in msg and "huggingface-cli download" in msg
    assert "HF_HOME" in msg and "model.loader.path=" in msg and "licence" in msg


def _fake_pipeline_folder(root: Path, with_weights: bool) -> Path:
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
    }
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text("{}")
    shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shard, "b": shard.replace("00001-of", "00002-of")}})
    )
    if with_weights:
        for s in (shard, shard.replace("00001-of", "00002-of")):
            (root / "transformer" / s).write_bytes(b"x")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


def test_hub_check_inspects_a_local_folder(tmp_path):
    incomplete = _fake_pipeline_folder(tmp_path / "a", with_weights=False)
    with pytest.raises(MissingWeightsError) as err:
        HubPipeline(repo_id="org/model", path=str(incomplete)).check()
    msg = str(err.value)
    assert "transformer/diffusion_pytorch_model-00001-of-00002.safetensors" in msg
    assert "text_encoder_3/" in msg and "org/model" in msg

    complete = _fake_pipeline_folder(tmp_path / "b", with_weights=True)
    with pytest.raises(MissingWeightsError, match="text_encoder_3/"):
        HubPipeline(repo_id="org/model", path=str(complete)).check()
    assert HubPipeline(repo_id="org/model", path=str(complete), drop_t5=True).check() == complete
    with pytest.raises(MissingWeightsError, match="does not exist"):
        HubPipeline(repo_id="org/model", path=str(tmp_path / "nowhere")).check()


def test_hub_check_is_variant_aware(tmp_path):
    # Only the fp16 shards of a sharded T5 were fetched (hf download --include "*fp16*").
    root = tmp_path / "p"
    (root / "text_encoder_3").mkdir(parents=True)
    (root / "model_index.json").write_text(
        json.dumps({"text_encoder_3": ["transformers", "T5EncoderModel"]})
    )
    te = root / "text_encoder_3"
    (te / "config.json").write_text("{}")
    shards = [f"model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (te / "model.safetensors.index.fp16.json").write_text(
        json.dumps({"weight_map": dict(zip("ab", shards))})
    )
    (te / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    for s in shards:
        (te / s).write_bytes(b"x")
    assert HubPipeline(repo_id="org/m", path=str(root), variant="fp16").check() == root
    with pytest.raises(MissingWeightsError, match="model-00001-of-00002"):
        HubPipeline(repo_id="org/m", path=str(root)).check()
    (te / shards[1]).unlink()
    with pytest.raises(MissingWeightsError, match=shards[1]):
        HubPipeline(repo_id="org/m", path=str(root), variant="fp16").check()


@pytest.mark.parametrize("builder,family", [(tiny_sd15, "sd15"), (tiny_sd3, "sd3")])
def test_hub_loader_round_trip_through_a_local_folder(tmp_path, builder, family):
    # The real load path (from_pretrained, local_files_only) on a saved tiny pipeline.
    ref = builder(seed=3)
    ref.save_pretrained(tmp_path / "pipe")
    loader = HubPipeline(
        repo_id="org/tiny", path=str(tmp_path / "pipe"), drop_t5=family == "sd3",
        scheduler="EulerDiscreteScheduler" if family == "sd15" else None,
    )  # fmt: skip
    assert loader.check() == tmp_path / "pipe"
    pipe = loader.load(family=family, dtype="fp32", device="cpu")
    assert pipe.edm_family == family and type(pipe) is type(ref)
    assert (family == "sd15") == (type(pipe.scheduler).__name__ == "EulerDiscreteScheduler")
    den, ref_den = adapter(pipe).denoiser(pipe), adapter(ref).denoiser(ref)
    a, b = den.state_dict(), ref_den.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = pipe.tokenizer(["a cat"]).input_ids
    assert ids == ref.tokenizer(["a cat"]).input_ids and pipe.tokenizer.model_max_length == 77
    with pytest.raises(ConfigError, match="model.family"):
        loader.load(family="sd4", dtype="fp32", device="cpu")


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_configs(name):
    cfg = _model_cfg(name)
    assert set(cfg.gen) >= {
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "batch_size",
    }
    assert cfg.dtype in ("fp16", "bf16")
    loader = instantiate(cfg.loader)  # validates the scheduler name
    assert isinstance(loader, HubPipeline) and loader.repo_id.count("/") == 1
    spec = archs.ARCHS[name]
    assert cfg.family == spec.family and cfg.gen.height == spec.resolution
    with pytest.raises(ConfigError, match="model.loader.scheduler"):
        HubPipeline(repo_id=loader.repo_id, scheduler="NotAScheduler")


# -- full-size architectures -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_full_size_param_counts_on_meta(name):
    spec = archs.ARCHS[name]
    model = archs.build_denoiser(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = count_params(model)
    if spec.params_with_pos_embed:
        n += model.pos_embed.pos_embed.numel()
    assert n == pytest.approx(spec.params, rel=spec.params_rtol), spec.params_note


def test_sd35_medium_is_not_the_diffusers_default():
    cfg = archs.ARCHS["sd35_medium"].config
    assert cfg["num_layers"] == 24 and cfg["qk_norm"] == "rms_norm"
    assert tuple(cfg["dual_attention_layers"]) == tuple(range(13))
    model = archs.build_denoiser("sd35_medium")
    blocks = model.transformer_blocks
    assert blocks[12].attn2 is not None and blocks[13].attn2 is None
    assert archs.ARCHS["sd35_large"].config["num_layers"] == 38


@pytest.mark.parametrize("name", ["full_sd15", "full_sdxl", "full_sd35_medium"])
def test_full_size_loader_on_meta(name):
    cfg = _model_cfg(name)
    loader = instantiate(cfg.loader, device="meta")
    assert isinstance(loader, FullSizePipeline)
    pipe = loader.load(family=cfg.family, dtype=cfg.dtype, device="cpu")
    denoiser = adapter(pipe).denoiser(pipe)
    spec = archs.ARCHS[cfg.loader.arch]
    assert pipe.edm_family == cfg.family and next(denoiser.parameters()).is_meta
    assert denoiser.config.get("num_layers", 0) == spec.config.get("num_layers", 0)
    with pytest.raises(ConfigError, match="model.loader.arch"):
        FullSizePipeline(arch="sd4")


def test_random_weights_on_cpu_are_finite_and_dense():
    # The materialize path of build_denoiser, on a small SD3-shaped spec (fast).
    spec = archs.ArchSpec(
        name="small", family="sd3", cls="SD3Transformer2DModel", resolution=64,
        config=dict(archs.ARCHS["sd3_medium"].config, num_layers=2, num_attention_heads=2,
                    caption_projection_dim=128, joint_attention_dim=64, pos_embed_max_size=16),
        text_dims=(32,), context_len=5, pooled_dim=2048,
    )  # fmt: skip
    model = archs.build_denoiser(spec, device="cpu", dtype=torch.bfloat16, seed=1)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert count_params(model, nonzero=True) == count_params(model)
    w = model.transformer_blocks[0].attn.to_q.weight.float()
    assert w.std() == pytest.approx(128**-0.5, rel=0.05) and not torch.equal(w[0], w[1])
    inputs = archs.sample_inputs(spec, device="cpu", dtype=torch.bfloat16)
    inputs["hidden_states"] = torch.randn_like(inputs["hidden_states"])
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.slow
def test_full_size_denoiser_runs_on_cpu_with_random_weights():
    # Real SD2.1 UNet (866 M) at 64 px, one call: random weights give a finite output.
    unet = archs.build_denoiser("sd21", device="cpu", dtype=torch.bfloat16)
    inputs = archs.sample_inputs("sd21", 64, 64, device="cpu", dtype=torch.bfloat16)
    inputs["sample"] = torch.randn_like(inputs["sample"])
    with torch.no_grad():
        out = unet(**inputs).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0

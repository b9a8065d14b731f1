"""CUDA checks (``-m gpu``): the paths users run on GPUs, on random or embedded weights.

Not in the default run (no GPU in CI). Run on a CUDA machine with
``python -m pytest -q -m gpu tests/test_gpu.py``. Each test compares the CUDA path with the CPU
path or with an invariant that holds on any device (bit-exact removal, ratio 0 = dense, exact
sparsity), so a device-specific bug (dtype, chunking, generator device, sync) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NO_DSAP = {"enabled": False}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off so fp32 CUDA results are comparable with CPU ones (as OBS-Diff's code does)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    "dtype,atol,map_rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 3e-2)]
)
def test_attention_with_map_matches_sdpa_on_cuda(dtype, atol, map_rtol):
    from edm.methods.token.attn_map import attention_with_map

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 10, 4096, 64, device="cuda", generator=g, dtype=dtype) for _ in "qkv"
    )
    ref = F.scaled_dot_product_attention(q, k, v)
    out, A, _ = attention_with_map(q, k, v)  # auto chunk size on CUDA
    out2, A2, _ = attention_with_map(q, k, v, chunk_mb=2.0)  # the CPU chunking
    assert torch.allclose(out.float(), ref.float(), atol=atol)
    # map entries ~1/4096; bf16 chunks sum heads in a different order than 2 MiB chunks
    assert torch.allclose(A, A2, rtol=map_rtol, atol=1e-7) and torch.allclose(out, out2, atol=atol)
    ones = torch.ones(2, 4096, device="cuda")  # rows of bf16 probabilities sum to 1 +- 1e-4
    assert A.dtype == torch.float32 and torch.allclose(A.sum(-1), ones, atol=1e-3)


@pytest.mark.parametrize("dtype,map_rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n,d", [(4096, 64), (1024, 40)])  # SD-XL 1024² level 2; SD1.5 head dim 40
def test_triton_map_matches_the_torch_map_on_cuda(dtype, map_rtol, n, d):
    """The triton kernels (method.map_kernel=triton, the CUDA default) against the chunked
    PyTorch map on identical inputs, with the time of each (printed: -s)."""
    from edm.methods.token.attn_map import attention_with_map
    from edm.methods.token.attn_map_triton import head_mean_map, resolve

    assert resolve("auto", "mean", torch.device("cuda")) == "triton"  # includes the self-check
    g = torch.Generator("cuda").manual_seed(0)
    q, k = (torch.randn(2, 10, n, d, device="cuda", generator=g, dtype=dtype) for _ in "qk")
    _, ref, _ = attention_with_map(q, k, k, need_out=False)
    got = head_mean_map(q, k)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=map_rtol, atol=1e-7)
    times = {}
    for name, fn in (("torch", lambda: attention_with_map(q, k, k, need_out=False)),
                     ("triton", lambda: head_mean_map(q, k))):
        fn()
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(10):
            fn()
        t1.record()
        torch.cuda.synchronize()
        times[name] = t0.elapsed_time(t1) / 10
    print(f"map of [2, 10, {n}, {d}] {dtype}: torch {times['torch']:.3f} ms, "
          f"triton {times['triton']:.3f} ms")


def test_obs_solver_cuda_matches_cpu():
    from edm.methods.weight.obs import obs_prune

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 256, generator=g) @ torch.randn(256, 256, generator=g)  # correlated
    W = torch.randn(192, 256, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    W_cpu, m_cpu = obs_prune(W, H, 0.5)
    W_gpu, m_gpu = obs_prune(W.cuda().half(), H.cuda(), 0.5)  # fp16 layer: solved in fp32
    assert W_gpu.dtype == torch.float32 and W_gpu.device.type == "cuda"
    for i in range(0, 256, 128):  # exact count per 128-column block on both devices
        assert int(m_gpu[:, i : i + 128].sum()) == int(m_cpu[:, i : i + 128].sum()) == 192 * 64
    agree = (m_gpu.cpu() == m_cpu).float().mean().item()
    assert agree > 0.98, agree  # fp16 rounding of W may flip a few near-threshold weights

    def rel(W_hat):
        return ((W_hat.cpu().float() - W) @ X.T).norm() / (W @ X.T).norm()

    assert abs(rel(W_gpu) - rel(W_cpu)) < 0.02 * rel(W_cpu)


# --------------------------------------------------------------------------- AT-EDM / ToMe


def _tiny(family):
    from edm.models.tiny import tiny_sd3, tiny_sd15, tiny_sdxl

    torch.manual_seed(0)
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3}[family]().to("cuda")


def _generate(pipe, guidance=3.0, steps=2):
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(2)]
    with torch.no_grad():
        return pipe(
            prompt=["a cat", "a dog"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            generator=gens,
            output_type="pt",
        ).images


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_atedm_on_cuda_identity_removal_and_cond_only_map(family, monkeypatch):
    from edm.methods.base import ApplyContext
    from edm.methods.token import attn_map
    from edm.methods.token.atedm import ATEDM

    pipe, ctx = _tiny(family), ApplyContext(family=family, device="cuda")
    dense = _generate(pipe)
    zero = ATEDM(prune_ratio=0.0)
    zero.apply(pipe, ctx)
    assert torch.equal(_generate(pipe), dense)
    zero.remove(pipe)
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP, profile="cuda")
    m.apply(pipe, ctx)
    pruned = _generate(pipe)
    map_seconds = m.run_metrics().get("time_map_s", 0)
    m.remove(pipe)
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, dense)
    assert map_seconds > 0
    assert torch.equal(_generate(pipe), dense)
    # the cond-half-only map gives the images of mapping both halves
    real = attn_map.attention_with_map
    monkeypatch.setattr(
        attn_map, "_attention_with_map_cfg", lambda slot, q, k, v, **kw: real(q, k, v, **kw)
    )
    m = ATEDM(prune_ratio=0.5, dsap=NO_DSAP)
    m.apply(pipe, ctx)
    both = _generate(pipe)
    m.remove(pipe)
    assert torch.allclose(both, pruned, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_atedm_triton_map_on_cuda_eager_and_compiled(family):
    """map_kernel=auto resolves to the triton kernels on CUDA; images match the PyTorch map's,
    and the denoiser compiles with fullgraph=True around the kernels (dynamo's user-defined
    triton kernel support), at most 2 graphs, equal to eager."""
    from edm.compiling import GraphCounter, compile_forward
    from edm.methods.base import ApplyContext
    from edm.methods.token.atedm import ATEDM

    pipe, ctx = _tiny(family), ApplyContext(family=family, device="cuda")
    imgs = {}
    for kernel in ("torch", "auto"):
        m = ATEDM(prune_ratio=0.5, map_kernel=kernel)
        assert m.apply(pipe, ctx).details["map_kernel"] == ("torch" if kernel == "torch" else "triton")
        imgs[kernel] = _generate(pipe, steps=4)
        if kernel == "auto":
            denoiser = getattr(pipe, "transformer", None) or pipe.unet
            counter = GraphCounter()
            torch._dynamo.reset()
            forward = denoiser.forward
            compile_forward(denoiser, fullgraph=True, backend=counter)
            try:
                compiled = _generate(pipe, steps=4)
            finally:
                denoiser.forward = forward
            assert 1 <= counter.graphs <= 2 and torch.equal(compiled, imgs["auto"]), counter.graphs
        m.remove(pipe)
    assert torch.allclose(imgs["auto"], imgs["torch"], atol=1e-3)


def test_tome_on_cuda_matches_tomesd_merge():
    """edm's merge kernel on CUDA equals the tomesd package's, same inputs and generator (up to
    the order of CUDA's atomic ``scatter_reduce``, which is not deterministic)."""
    tomesd_merge = pytest.importorskip("tomesd.merge")
    from edm.methods.token.tome_kernel import bipartite_merge

    x = torch.randn(2, 64 * 64, 320, device="cuda")
    r = int(0.5 * 4096)
    g_ref, g_me = torch.Generator("cuda").manual_seed(0), torch.Generator("cuda").manual_seed(0)
    m_ref, u_ref = tomesd_merge.bipartite_soft_matching_random2d(
        x, 64, 64, 2, 2, r, no_rand=False, generator=g_ref
    )
    m_me, u_me = bipartite_merge(x, 64, 64, r, 2, 2, use_rand=True, generator=g_me)
    y = m_ref(x)
    assert m_me(x).shape == y.shape == (2, 4096 - r, 320)
    assert torch.allclose(m_me(x), y, atol=1e-5) and torch.allclose(u_me(y), u_ref(y), atol=1e-5)
    assert torch.equal(g_me.get_state(), g_ref.get_state())  # same random draws


# --------------------------------------------------------------------------- end to end


def _run(compose_cfg, *overrides):
    from edm.runner import run

    cfg = compose_cfg("device=cuda", "logger=none", *overrides)
    run(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]


def test_digits_on_cuda_end_to_end(compose_cfg):
    """The embedded default on CUDA: dense quality holds, OBS-Diff and AT-EDM run, memory is
    reported from the CUDA allocator."""
    dense = _run(compose_cfg, "data.num_prompts=50")
    assert dense["eval/prompt_acc"] >= 0.9, dense
    assert dense["perf/peak_mem_gb"] > 0, dense
    obs = _run(compose_cfg, "data.num_prompts=20", "method=obs_diff", "sparsity=0.5")
    assert abs(obs["method/sparsity"] - 0.5) <= 0.01, obs
    tok = _run(compose_cfg, "data.num_prompts=20", "method=at_edm", "method.prune_ratio=0.3")
    assert tok["perf/gflops_per_step"] < dense["perf/gflops_per_step"] * 1.05


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl", "tiny_sd3"])
def test_tiny_families_on_cuda_fp16(compose_cfg, model):
    m = _run(
        compose_cfg,
        f"model={model}",
        "model.dtype=fp16",
        "data.num_prompts=2",
        "gen.batch_size=2",
        "method=magnitude",
        "sparsity=0.5",
    )
    assert m["perf/gflops_per_step"] > 0 and abs(m["method/sparsity"] - 0.5) <= 0.01


def test_diff_pruning_on_cuda(compose_cfg):
    """Taylor importance, torch-pruning slicing and fine-tuning on the GPU (embedded model)."""
    m = _run(
        compose_cfg,
        "data.num_prompts=20",
        "method=diff_pruning",
        "sparsity=0.2",
        "method.finetune_steps=20",
    )
    assert 0.1 < m["method/param_reduction"] < 0.5 and m["method/finetune_loss"] > 0
    assert m["eval/prompt_acc"] >= 0  # generation and evaluation ran on the sliced UNet


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_export_matches_masked_dense(dtype):
    """method.export=semi_structured: 2:4 magnitude on tiny_sd3 (MMDiT linears, 64-multiples),
    then the same UNet call with the masked dense weights and with the semi-structured ones.
    Records the layers converted; outputs agree to the dtype's GEMM tolerance."""
    import copy

    from edm.configs import method as build
    from edm.methods.base import ApplyContext
    from edm.models.tiny import tiny_sd3
    from edm.perf import is_semi_structured

    pipe = tiny_sd3().to("cuda", dtype)
    ctx = ApplyContext(family="sd3")
    masked = copy.deepcopy(pipe)
    build("method=magnitude", "sparsity=0.5", "method.pattern=2:4").apply(masked, ctx)
    report = build("method=magnitude", "sparsity=0.5", "method.pattern=2:4",
                   "method.export=semi_structured", "method.keep_backup=true").apply(pipe, ctx)
    exp = report.details["export"]
    print(f"{dtype}: converted {len(exp['converted'])}, skipped {exp['skipped']}")
    assert exp["converted"], exp
    assert any(is_semi_structured(p) for p in pipe.transformer.parameters())
    tr, ref = pipe.transformer, masked.transformer
    g = torch.Generator("cuda").manual_seed(0)
    c = tr.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g, device="cuda", dtype=dtype)
    ctx_t = torch.randn(2, 8, c.joint_attention_dim, generator=g, device="cuda", dtype=dtype)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g, device="cuda", dtype=dtype)
    t = torch.tensor([500.0, 500.0], device="cuda")
    from edm.eval.flops import flop_counter

    flops, outs = {}, {}
    for name, model in (("sparse", tr), ("masked", ref)):
        with torch.no_grad(), flop_counter() as fc:
            outs[name] = model(x, encoder_hidden_states=ctx_t, pooled_projections=pooled,
                               timestep=t).sample
        flops[name] = fc.get_total_flops()
    torch.testing.assert_close(outs["sparse"].float(), outs["masked"].float(), rtol=0, atol=5e-2)
    # perf/gflops_per_step of an exported model: the GEMMs' dense shapes, as for the masked model
    # (a semi-structured op without a FLOP formula would silently count 0 and fake a speed-up)
    print(f"{dtype}: FLOPs sparse {flops['sparse']:.4g} vs masked {flops['masked']:.4g}")
    assert flops["sparse"] == flops["masked"], flops

"""The Triton head-mean map (CUDA path of AT-EDM's pruning layers) against the PyTorch path on
identical inputs, run on CPU by Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must
be set before triton kernels are defined)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from edm.methods.token import attn_map_triton as T
    from edm.methods.token.attn_map import attention_with_map
    assert T.INTERPRET and T.available(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    cases = [  # (B, h, N, d, map_from, n_map, transposed layout)
        (2, 2, 64, 16, 0, None, False),    # one block
        (1, 3, 150, 40, 0, None, True),    # SD1.5's head dim 40 (padded to 64), ragged blocks
        (2, 2, 100, 24, 0, 77, False),     # MMDiT: image tokens first, text keys cut
        (1, 2, 90, 32, 10, 64, False),     # FLUX: text tokens first, the image range after them
        (1, 2, (70, 20), 16, 0, None, False),  # cross-attention (score_source=cross): Nq != Nk
    ]
    for b, h, n, d, m0, n_map, transposed in cases:
        nq, nk = n if isinstance(n, tuple) else (n, n)
        q = torch.randn(b, h, nq, d, generator=g) * 2
        k = torch.randn(b, h, nk, d, generator=g) * 2
        if transposed:  # [B, N, h, d] memory viewed as [B, h, N, d], as the processors' heads
            q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
        _, ref, _ = attention_with_map(q, k, k, n_map=n_map, map_from=m0, need_out=False)
        got = T.head_mean_map(q, k, map_from=m0, n_map=n_map, block=32)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        err = (got - ref).abs().max().item()
        assert err < 1e-5 * ref.abs().max().item() + 1e-7, (b, h, n, d, m0, n_map, err)
        assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # a batch whose offsets would overflow int32 is split (limit shrunk to split at 1 sample)
    q = torch.randn(3, 2, 40, 16, generator=g)
    k = torch.randn(3, 2, 40, 16, generator=g)
    _, ref, _ = attention_with_map(q, k, k, need_out=False)
    T.INDEX_LIMIT, limit = 2 * 40 * 16, T.INDEX_LIMIT
    assert torch.allclose(T.head_mean_map(q, k, block=16), ref, rtol=1e-5, atol=1e-7)
    T.INDEX_LIMIT = limit
    # half precision inputs: the map in fp32 from fp16 products, close to the fp32 path
    q = torch.randn(1, 2, 64, 32, generator=g)
    k = torch.randn(1, 2, 64, 32, generator=g)
    _, ref, _ = attention_with_map(q, k, k, need_out=False)
    got = T.head_mean_map(q.half(), k.half(), block=32)
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 2e-3 * ref.abs().max()

    # end to end: AT-EDM with the triton map == with the torch map, on every UNet prune point
    # (sd15: after_self_attn + kept-row SDPA; sdxl: after_ffn, output by SDPA) and MMDiT (sd3)
    from edm.methods.base import ApplyContext
    from edm.methods.token.atedm import ATEDM
    from edm.models.tiny import tiny_sd3, tiny_sd15, tiny_sdxl
    for family, make in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl), ("sd3", tiny_sd3)):
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        imgs = {}
        for kernel in ("torch", "triton"):
            m = ATEDM(prune_ratio=0.5, dsap={"enabled": False}, map_kernel=kernel)
            rep = m.apply(pipe, ApplyContext(family=family))
            assert rep.details["map_kernel"] == kernel
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            with torch.no_grad():
                imgs[kernel] = pipe(prompt=["a cat", "a dog"], num_inference_steps=2, height=32,
                                    width=32, generator=gens, output_type="pt").images
            m.remove(pipe)
        err = (imgs["torch"] - imgs["triton"]).abs().max().item()
        assert err < 1e-4, (family, err)
    print("ok")
""")


def test_triton_map_matches_the_pytorch_map_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_map_kernel_knob_resolves_by_device_and_rejects_what_cannot_run():
    import torch

    from edm.errors import ConfigError
    from edm.methods.token import attn_map_triton as T
    from edm.methods.token.atedm import ATEDM

    cpu = torch.device("cpu")
    assert T.resolve("auto", "mean", cpu) == "torch" and T.resolve("torch", "mean", cpu) == "torch"
    assert T.resolve("auto", "rms", torch.device("meta")) == "torch"
    with pytest.raises(ConfigError, match="method.map_kernel.*CUDA"):
        T.resolve("triton", "mean", cpu)
    with pytest.raises(ConfigError, match="method.map_kernel"):
        T.resolve("cuda", "mean", cpu)
    with pytest.raises(ConfigError, match="method.map_kernel"):
        ATEDM(map_kernel="triton", head_reduce="rms")
    with pytest.raises(ConfigError, match="method.map_kernel"):
        ATEDM(map_kernel="fused")

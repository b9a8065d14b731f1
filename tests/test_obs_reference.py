"""``method.mask_rule=reference``: unstructured OBS-Diff is bit-identical to the official
``Alrightlone/OBS-Diff`` ``lib/OBS_Diff.py::OBS_Diff.fasterprune`` (re-implemented below, line by
line, on a bare weight and Hessian); ``exact`` (default) keeps the exact per-block count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edm.errors import ConfigError
from edm.methods.weight import OBSDiff, SparseGPT
from edm.methods.weight.obs import obs_prune


def _official_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """The official loop with ``self.layer.weight.data`` -> W and ``self.H`` -> H (losses, timing,
    DEBUG and the Conv1D transposes dropped: they do not touch the result)."""
    W = W.clone()
    W = W.float()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    mask = None

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2
                    / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0

            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _inputs(rows, cols, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * cols, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    X = X * torch.exp(torch.randn(cols, generator=g))
    X[:, list(dead)] = 0
    H = 2 * X.T @ X / X.shape[0]
    return torch.randn(rows, cols, generator=g), H


@pytest.mark.parametrize(
    "rows,cols,blocksize,sparsity",
    [
        (24, 256, 128, 0.5),
        (24, 256, 64, 0.6),
        (17, 200, 128, 0.33),  # 17 * 128 * 0.33 = 718.08 and a 72-column last block
        (9, 96, 32, 0.45),  # 9 * 32 * 0.45 = 129.6
        (12, 100, 30, 0.7),
        (8, 64, 128, 0.1),  # one block narrower than blocksize
    ],
)
def test_reference_rule_bit_identical_to_official(rows, cols, blocksize, sparsity):
    W, H = _inputs(rows, cols, seed=rows + cols + blocksize, dead=(3,))
    ref = _official_fasterprune(W, H, sparsity, blocksize=blocksize)
    got, mask = obs_prune(W, H, sparsity, blocksize=blocksize, mask_rule="reference")
    assert torch.equal(got, ref)
    exact, exact_mask = obs_prune(W, H, sparsity, blocksize=blocksize)
    for i1 in range(0, cols, blocksize):
        k = int(rows * min(blocksize, cols - i1) * sparsity)
        # the official threshold keeps sorted[k] itself: one weight more (no ties in random data)
        assert int(mask[:, i1 : i1 + blocksize].sum()) == k + 1
        assert int(exact_mask[:, i1 : i1 + blocksize].sum()) == k
    assert not torch.equal(exact, ref)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("rule", ["exact", "reference"])
def test_nm_is_official_under_either_rule(n, m, rule):
    W, H = _inputs(16, 128, seed=n * m)
    ref = _official_fasterprune(W, H, 0.5, prunen=n, prunem=m, blocksize=64)
    got, _ = obs_prune(W, H, 0.5, n, m, blocksize=64, mask_rule=rule)
    assert torch.equal(got, ref)


class _Stat:
    def __init__(self, H):
        self.H = H

    def free(self):
        self.H = None


@pytest.mark.parametrize("cls", [OBSDiff, SparseGPT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_method_prune_layer_uses_the_rule(cls, dtype):
    W, H = _inputs(20, 192, seed=5)
    lin = nn.Linear(192, 20, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    method = cls(sparsity=0.45, num_groups=1, mask_rule="reference")
    method.prune_layer("lin", lin, _Stat(H))
    ref = _official_fasterprune(W.to(dtype), H, 0.45)  # it starts from the layer's own weight
    # the official code casts back to the layer dtype: ``W.reshape(...).to(weight.dtype)``
    assert torch.equal(lin.weight.detach(), ref.to(dtype))
    default = cls(sparsity=0.45, num_groups=1)
    assert default.mask_rule == "exact"


def test_bad_mask_rule_is_a_config_error_at_construction():
    for cls in (OBSDiff, SparseGPT):
        with pytest.raises(ConfigError) as e:
            cls(sparsity=0.5, mask_rule="loose")
        assert e.value.key == "method.mask_rule"
        assert e.value.allowed == ["exact", "reference"]
    with pytest.raises(ValueError):
        obs_prune(torch.ones(2, 4), torch.eye(4), 0.5, mask_rule="loose")

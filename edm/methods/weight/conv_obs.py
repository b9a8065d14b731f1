"""OBS compensation for *given* structured masks on Linear and Conv2d consumers. Pure tensors.

OBS-Diff's Table 10 (spec §2.8) keeps Diff-Pruning's channel masks and adds the OBS weight update
to the layers that *read* the removed channels (their consumers). For a consumer with weight
``W`` [rows, cols] and the Hessian ``H`` of its input (``hessian.HessianStat``), removing the
column set ``S`` and compensating every other column is the multi-column OBS step::

    delta W = -W[:, S] (H^-1[S, S])^-1 H^-1[S, :]        (W[:, S] becomes exactly 0)

which is the least-squares refit of the surviving columns, ``min ||W X - W' X||`` with
``W'[:, S] = 0`` (the test checks both forms agree). ``structured.obs_prune_structured`` chooses
the columns itself by Eq. 6/7; here the mask comes from torch-pruning and only the update is OBS.

When the surviving inputs themselves have changed -- upstream layers were pruned, a GroupNorm
now normalises fewer channels per group -- the same least-squares idea refits the kept columns
to the *dense* output on the inputs the pruned network really gives the layer
(:func:`refit_to_dense`): ``min ||W X - W' X_hat||``. With ``X_hat = X[R]`` it is the OBS update.

Convolutions are linear maps of their unfolded (im2col) input: ``conv(x) = W.reshape(out, -1) @
unfold(x)``. ``F.unfold`` orders rows channel-major, so input channel ``c`` owns the ``kh * kw``
columns ``c*kh*kw ... (c+1)*kh*kw - 1`` -- a channel is a group of columns, laid out like
``structured.py``'s heads (group-major).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edm.methods.weight.obs import hinv_cholesky, prepare_hessian
from edm.methods.weight.structured import reconstruction_error

__all__ = ["channel_columns", "consumer_input", "obs_remove_columns", "output_error",
           "reconstruction_error", "refit_columns", "refit_to_dense", "zero_columns"]


def channel_columns(channels: torch.Tensor | list[int], group: int) -> torch.Tensor:
    """Input-channel indices -> weight-column indices of ``W.reshape(out, -1)`` (group-major)."""
    ch = torch.as_tensor(channels, dtype=torch.long).flatten()
    return (ch[:, None] * group + torch.arange(group)).flatten()


def consumer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` as the rows its weight matrix multiplies: ``[b, tokens, cols]``.

    Linear: unchanged (``[..., in]``). Conv2d: the im2col patches with the layer's own kernel,
    padding, stride and dilation, ``[b, H_out * W_out, in * kh * kw]``, so that
    ``module.weight.reshape(out, -1) @ patch`` is the convolution at that output position.
    """
    if isinstance(module, nn.Linear):
        return x
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise TypeError(f"OBS compensation supports Linear and ungrouped Conv2d, not {module}")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise TypeError(f"only explicit zero padding is unfolded exactly, not {module}")
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)
    return cols.transpose(1, 2)


def zero_columns(W: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The update-free baseline: the removed columns set to 0, nothing else changed (fp32)."""
    W = W.detach().float().clone()
    W[:, cols] = 0
    return W


def obs_remove_columns(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor,
                       percdamp: float = 0.01) -> torch.Tensor:
    """Remove ``cols`` of ``W`` and compensate the rest with the OBS update (fp32 result).

    Args:
        W: ``[rows, n]`` consumer weight (a conv weight reshaped to ``[out, in*kh*kw]``).
        H: ``[n, n]`` Hessian of the (unfolded) consumer input; not modified.
        cols: column indices to remove (e.g. :func:`channel_columns`).
        percdamp: damping as a fraction of mean(diag H) (0.01, as every OBS solver here);
            ``obs.hinv_cholesky`` raises it tenfold on a Cholesky failure.
    """
    cols = torch.as_tensor(cols, dtype=torch.long, device=W.device).flatten()
    W0 = W.detach().float()
    # fp32 copies; never-active inputs (diag H == 0) are decoupled in H (so they get no update)
    # and zeroed in W, which is restored below: the mask, not the calibration set, decides
    # which weights go.
    W, H, dead = prepare_hessian(W, H)
    dead[cols] = False
    W[:, dead] = W0[:, dead]
    if cols.numel() == 0:
        return W
    U = hinv_cholesky(H, percdamp)
    Hinv = U.T @ U
    Hinv_S = Hinv[cols]  # [|S|, n]
    # E = W_S (Hinv_SS)^-1 via a solve (Hinv_SS is symmetric positive definite)
    E = torch.linalg.solve(Hinv_S[:, cols], W[:, cols].T).T
    W -= E @ Hinv_S
    W[:, cols] = 0  # exact zeros (the update leaves ~1e-7 there)
    return W


def refit_columns(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Least-squares refit of the surviving columns (no damping): the closed form the OBS
    update equals, ``W'_R = W H[:, R] H[R, R]^-1``; a reference for tests."""
    W, H = W.detach().double(), H.detach().double()
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    keep[cols] = False
    out = torch.zeros_like(W)
    out[:, keep] = torch.linalg.solve(H[keep][:, keep], (W @ H[:, keep]).T).T
    return out.float()


def refit_to_dense(W: torch.Tensor, C: torch.Tensor, H_hat: torch.Tensor, keep: torch.Tensor,
                   percdamp: float = 0.01) -> torch.Tensor:
    """``argmin_V ||W X - V X_hat||^2 = W C^T (H_hat + damp I)^-1`` (fp32).

    Args:
        W: ``[rows, n]`` dense weight (the rows the pruned layer keeps).
        C: ``[m, n]`` cross moment ``X_hat^T X`` of the pruned-network input (``m`` kept
            columns) and the dense input, over the same calibration tokens.
        H_hat: ``[m, m]`` second moment ``X_hat^T X_hat`` of the pruned-network input.
        keep: ``[m]`` the dense columns the pruned input holds, in its order.
        percdamp: ridge damping as a fraction of mean(diag H_hat). Columns that are never
            active (diag 0) keep ``W``'s value: the calibration set says nothing about them.
    Returns:
        ``[rows, m]``.
    """
    W, C, H_hat = W.detach().float(), C.detach().float(), H_hat.detach().float()
    dead = torch.diagonal(H_hat) == 0
    Hd = H_hat.clone()
    Hd.diagonal().add_(percdamp * torch.diagonal(H_hat).mean().clamp_min(1e-12))
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info):  # not positive definite at this damping: refit nothing rather than fail
        raise torch.linalg.LinAlgError("H_hat is not positive definite; raise method.percdamp")
    V = torch.cholesky_solve(C @ W.T, L).T  # (H_hat + damp)^-1 C W^T, transposed
    V[:, dead] = W[:, keep][:, dead]  # decoupled (zero rows of H_hat): no coupling to undo
    return V


def output_error(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor, C: torch.Tensor,
                 H_hat: torch.Tensor) -> float:
    """``||W X - V X_hat||^2`` from the moments: ``tr(W H W^T) - 2 tr(V C W^T) + tr(V H_hat V^T)``
    (same normalisation as the moments)."""
    W, V = W.double(), V.double()
    e = (torch.einsum("ij,jk,ik->", W, H.double(), W) - 2 * torch.einsum("ij,jk,ik->", V,
         C.double(), W) + torch.einsum("ij,jk,ik->", V, H_hat.double(), V))
    return float(e.clamp_min(0))

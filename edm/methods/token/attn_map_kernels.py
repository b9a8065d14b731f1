"""Triton kernels of :mod:`edm.methods.token.attn_map_triton` (imported on first use: importing
triton costs ~0.3 s, and CPU-only torch installs may lack it)."""

import triton
import triton.language as tl


@triton.jit
def row_lse_kernel(q_ptr, k_ptr, lse_ptr, H, MQ, NK, D, Q0, scale,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    q = tl.load(q_ptr + b * sqb + h * sqh + (Q0 + rows)[:, None] * sqn + dims[None, :] * sqd,
                mask=(rows[:, None] < MQ) & (dims[None, :] < D), other=0.0)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s_sum = tl.zeros((BM,), tl.float32)
    for j0 in range(0, NK, BN):
        cols = j0 + tl.arange(0, BN)
        k = tl.load(k_ptr + b * skb + h * skh + cols[None, :] * skn + dims[:, None] * skd,
                    mask=(cols[None, :] < NK) & (dims[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        s = tl.where(cols[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + bh * MQ + rows, m + tl.log(s_sum), mask=rows < MQ)

@triton.jit
def head_sum_kernel(q_ptr, k_ptr, lse_ptr, a_ptr, H, MQ, MK, D, Q0, scale,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    qmask = (rows[:, None] < MQ) & (dims[None, :] < D)
    kmask = (cols[None, :] < MK) & (dims[:, None] < D)
    acc = tl.zeros((BM, BN), tl.float32)
    for h in range(0, H):
        q = tl.load(q_ptr + b * sqb + h * sqh + (Q0 + rows)[:, None] * sqn + dims[None, :] * sqd,
                    mask=qmask, other=0.0)
        k = tl.load(k_ptr + b * skb + h * skh + (Q0 + cols)[None, :] * skn + dims[:, None] * skd,
                    mask=kmask, other=0.0)
        lse = tl.load(lse_ptr + (b * H + h) * MQ + rows, mask=rows < MQ, other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        acc += tl.exp(s - lse[:, None])
    tl.store(a_ptr + b * MQ * MK + rows[:, None] * MK + cols[None, :], acc,
             mask=(rows[:, None] < MQ) & (cols[None, :] < MK))

"""DDPM fine-tuning of a (structurally pruned) UNet: the training half of Diff-Pruning.

Standard DDPM training (Ho et al. 2020): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` at a uniform
``t``, MSE to the scheduler's ``prediction_type`` target (:func:`training_target`: ``eps`` or
``v``), AdamW, gradient clipping at 1. Conditional UNets (digits) get their text keywords
(a *cond*: :func:`text_cond`) with an empty-prompt dropout so classifier-free guidance keeps
working; unconditional ones (``UNet2DModel``, family ``ddpm``) are called without them.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def text_cond(pipe, prompts: list[str] | None, chunk: int = 256) -> dict | None:
    """The UNet text keywords of ``prompts`` as one batch-first dict (``None``: unconditional).

    ``encoder_hidden_states`` always; ``encoder_attention_mask`` too when the pipeline's UNet was
    trained with its padding masked (``DigitsPipeline.text_kwargs``, model=layouts), so every
    training / calibration call sees the text exactly as sampling does."""
    if prompts is None:
        return None
    encode = getattr(pipe, "text_kwargs", None) or (
        lambda ps: {"encoder_hidden_states": pipe.encode_prompt(ps)})
    parts = [encode(list(prompts[i : i + chunk])) for i in range(0, len(prompts), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def cond_rows(cond: dict | None, rows) -> dict:
    """The UNet keywords of ``rows`` (an index tensor or a slice) of ``cond``; ``{}`` if ``None``."""
    return {} if cond is None else {k: v[rows] for k, v in cond.items()}


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts at ``alpha_bar = a`` (its scheduler's ``prediction_type``): the
    noise, ``v = sqrt(a) noise - sqrt(1 - a) x0`` (SD 2.x, the layouts model) or ``x0``. Shared
    by Diff-Pruning's gradient pass and fine-tune and by the layouts training recipe."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r} (epsilon, v_prediction, sample)")


def finetune(unet, scheduler, x_all, ctx_all, *, steps, lr, batch_size, p_uncond, empty_ctx,
             generator, ema_decay=0.0, hflip=False, dropout=None) -> dict:
    """Standard DDPM training of the pruned UNet for ``steps`` steps.

    ``ctx_all``: a cond (:func:`text_cond`), ``None``: unconditional (no prompt dropout);
    ``empty_ctx``: the cond of the empty prompt (one row). ``ema_decay`` > 0: the UNet ends
    with the moving average of its weights; ``hflip``: random horizontal flips of x0;
    ``dropout``: the rate of every ``nn.Dropout`` while training (``None`` = the model's own;
    restored afterwards, so sampling is unaffected either way).
    """
    if steps == 0:
        return {"steps": 0, "seconds": 0.0, "final_loss": None}
    g = generator
    t0 = time.perf_counter()
    T = scheduler.config.num_train_timesteps
    alphas = scheduler.alphas_cumprod.to(x_all.device, torch.float32)
    drops = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in drops]
    if dropout is not None:
        for m in drops:
            m.p = float(dropout)
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    running = []
    with torch.enable_grad():
        for k in range(steps):
            i = torch.randint(len(x_all), (batch_size,), generator=g)
            x0 = x_all[i]
            if hflip:
                flip = (torch.rand(batch_size, generator=g) < 0.5).to(x0.device)
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            kw = {}
            if ctx_all is not None:
                drop = torch.rand(batch_size, generator=g) < p_uncond
                kw = {k: v.clone() for k, v in cond_rows(ctx_all, i).items()}
                for k, v in kw.items():  # states and mask rows of the dropped prompts: the empty one's
                    v[drop.to(v.device)] = empty_ctx[k][0].to(v)
            t = torch.randint(T, (batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0)
            a = alphas[t].view(-1, 1, 1, 1).to(x0)
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.to(x0.device), **kw).sample
            loss = F.mse_loss(pred.float(), training_target(scheduler, x0, noise, a).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:  # ema <- ema + (1 - d) (p - ema)
                d = min(ema_decay, (1 + k) / (10 + k))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d)
            running.append(loss.item())
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    for m, p in zip(drops, rates):
        m.p = p
    unet.eval()
    tail = running[-min(50, len(running)):]
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail),
            "ema_decay": ema_decay, "dropout": dropout}

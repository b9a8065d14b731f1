"""Diff-Pruning (Fang, Ma, Wang, NeurIPS 2023; spec §3.2): structural channel pruning of the UNet
with a Taylor importance accumulated over the informative (low-noise) timesteps, then optional
fine-tuning. Unlike the other methods here it needs training *images*: it runs on the embedded
digits model (whose training split ships with scikit-learn) and on the unconditional DDPM UNets
it was designed for (``model=ddpm_cifar10`` with CIFAR-10, ``model=tiny_ddpm``).

Procedure (``ddpm_prune.py``):

1. one batch of clean training images x0 and one fixed noise draw eps;
2. for t = 0, 1, 2, ... (low noise first): loss_t = MSE(unet(add_noise(x0, eps, t), t), eps),
   ``backward()`` (gradients ACCUMULATE over t), loss_max = max(loss_max, loss_t); stop once
   loss_t < thr * loss_max -- the high-noise steps, which carry little signal, are left out;
3. Torch-Pruning's ``TaylorImportance`` (per channel sum |w * grad|) and a ``MetaPruner`` with
   ``pruning_ratio = sparsity`` remove channels from every prunable group (``conv_out`` kept);
4. repair the static attributes diffusers modules cache (``Upsample2D.channels``...);
5. optionally (``obs_update``, OBS-Diff Table 10) compensate the layers reading the removed
   channels with the OBS update, at exactly these masks (``diff_pruning_obs``);
6. optionally fine-tune ``finetune_steps`` with the standard DDPM loss.

Measured pitfall: called the way Diff-Pruning calls it, torch-pruning 1.6.1 prunes attention
widths to sizes the head count cannot divide (e.g. 16 -> 11 channels for 2 heads) and the forward
fails; passing ``num_heads={to_q/to_k/to_v: attn.heads}`` makes it prune head dimensions
uniformly, so widths stay divisible (``tests/test_diff_pruning.py`` checks both).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edm.errors import ConfigError, UnsupportedFamily
from edm.methods.base import ApplyContext, MethodReport, WeightMethod
from edm.methods.weight.base_weight import build_report, param_change
from edm.methods.weight.diff_pruning_obs import OBS_MODES, MaskRecorder, obs_update
from edm.methods.weight.finetune import cond_rows, finetune, text_cond, training_target
from edm.methods.weight.hessian import WEIGHTINGS
from edm.methods.weight.io import save_to_run

log = logging.getLogger(__name__)

IMPORTANCES = ("taylor", "magnitude", "random")


def attention_heads(unet: nn.Module) -> dict[nn.Module, int]:
    """``{to_q/to_k/to_v: heads}`` of every diffusers ``Attention`` (torch-pruning's num_heads)."""
    from diffusers.models.attention_processor import Attention

    return {lin: m.heads for m in unet.modules() if isinstance(m, Attention)
            for lin in (m.to_q, m.to_k, m.to_v)}


def repair_static_attributes(unet: nn.Module) -> int:
    """Re-derive the channel counts diffusers modules cache at construction from the (pruned)
    tensors. Diff-Pruning's ``ddpm_prune.py`` does this for ``Upsample2D/Downsample2D.channels``
    (whose ``forward`` asserts it); the rest keeps ``save_pruned`` metadata truthful."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    def width(layer, out=True):
        if isinstance(layer, nn.Linear):
            return layer.out_features if out else layer.in_features
        return layer.out_channels if out else layer.in_channels

    n = 0
    for m in unet.modules():
        if isinstance(m, (Upsample2D, Downsample2D)) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Transformer2DModel) and getattr(m, "proj_in", None) is not None:
            m.in_channels, m.inner_dim = width(m.proj_in, False), width(m.proj_in)
            m.out_channels = width(m.proj_out)
        elif isinstance(m, Attention):
            m.inner_dim, m.inner_kv_dim = m.to_q.out_features, m.to_k.out_features
            m.query_dim, m.out_dim = m.to_q.in_features, m.to_out[0].out_features
            m.cross_attention_dim = m.to_k.in_features
        elif isinstance(m, BasicTransformerBlock):
            m.dim = m.attn1.to_q.in_features
        else:
            continue
        n += 1
    return n


def accumulate_gradients(
    unet: nn.Module,
    scheduler,
    x0: torch.Tensor,
    context: dict | None,
    thr: float,
    generator: torch.Generator,
    t_stride: int = 1,
) -> dict:
    """Step 2 of the procedure: gradients summed over t = 0, t_stride, ... until the loss ratio
    drops below ``thr`` (0 = use every timestep). Returns the timesteps used and their losses.
    ``context``: the UNet text keywords of a conditional UNet (``finetune.text_cond``), ``None``
    for an unconditional one."""
    T = scheduler.config.num_train_timesteps
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    alphas = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    unet.zero_grad(set_to_none=True)
    losses, loss_max = [], 0.0
    with torch.enable_grad():
        for t in range(0, T, t_stride):
            a = alphas[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            target = training_target(scheduler, x0, noise, a)
            loss = F.mse_loss(unet(xt, tt, **cond_rows(context, slice(None))).sample.float(), target)
            loss.backward()
            losses.append(loss.item())
            loss_max = max(loss_max, losses[-1])
            if losses[-1] < thr * loss_max:
                break
    return {"timesteps_used": len(losses), "last_t": t, "loss_max": loss_max, "losses": losses}


class DiffPruning(WeightMethod):
    """Diff-Pruning on UNets with training data (digits; DDPM UNets: family ``ddpm``).

    Args:
        sparsity: torch-pruning ``pruning_ratio``: fraction of channels removed from every
            prunable group (0.3 in the paper's scripts; on DDPM CIFAR-10 it gives the 13.95 M
            parameters of OBS-Diff's Table 10).
        thr: loss-ratio threshold that ends gradient accumulation (0.05, the CIFAR default;
            0 = all 1000 timesteps, the "T = 0.00" row of the paper).
        importance: ``taylor`` (Diff-Pruning: |w * grad| over the kept timesteps), ``magnitude``
            (|w|^magnitude_p) or ``random`` -- the rows of the paper's baselines.
        magnitude_p: norm of the magnitude importance (1 here so far; Diff-Pruning's
            ``ddpm_prune.py`` uses torch-pruning's default, 2).
        batch_size: training images used for the importance (the paper uses one batch of 128).
        t_stride: evaluate every ``t_stride``-th timestep (1 = the paper; larger = faster).
        num_heads: pass the attention head counts to torch-pruning (keep True; False reproduces
            the failure described in the module docstring).
        obs_update: OBS-Diff Table 10: keep these masks and compensate every layer that reads a
            removed channel with the OBS update (``diff_pruning_obs``), before fine-tuning.
        obs_mode: ``sequential`` (default: layers in forward order, each refit to its dense
            output on the inputs the pruned network gives it) or ``dense`` (Eq. 6 with the
            dense-model Hessians, one pass; see ``diff_pruning_obs`` for why both exist).
        obs_images, obs_timesteps, obs_batch_size: its calibration: that many training images,
            each noised to that many of the sampler's timesteps, forwarded in batches.
        obs_weighting: per-timestep Hessian weights (``hessian.WEIGHTINGS``; OBS-Diff's
            ``log_decrease``). percdamp: Hessian damping (0.01, as every OBS solver here).
        finetune_steps: fine-tuning steps after pruning (0 = none, the CLI default; the quality
            study uses 500, the paper 100 K on CIFAR-10). finetune_lr, finetune_batch_size,
            p_uncond: its AdamW learning rate, batch size and the empty-prompt rate that keeps
            classifier-free guidance working (conditional models only).
        ema_decay: keep an exponential moving average of the fine-tuned weights and end with it
            (0 = off; DDPM training uses 0.9999), warmed up as ``min(decay, (1+k)/(10+k))``.
        hflip: random horizontal flips while fine-tuning (CIFAR-10 DDPM training; not digits).
        finetune_dropout: dropout rate while fine-tuning (``None`` = the model's; Diff-Pruning's
            CIFAR-10 script: 0.1).
        save: write the pruned UNet with ``io.save_pruned`` to ``<output_dir>/pruned_model`` so a
            later run can reload it with ``model.pruned_from=<that dir>``.
    """

    supported_families: ClassVar[tuple[str, ...]] = ("digits", "ddpm")
    needs_calib = False
    needs_train_data = True  # runner pre-flight: the loader's training images (check_train_data)

    def __init__(
        self,
        sparsity: float,
        thr: float = 0.05,
        importance: str = "taylor",
        magnitude_p: int = 1,
        batch_size: int = 128,
        t_stride: int = 1,
        num_heads: bool = True,
        obs_update: bool = False,
        obs_mode: str = "sequential",
        obs_images: int = 64,
        obs_timesteps: int = 8,
        obs_batch_size: int = 64,
        obs_weighting: str = "log_decrease",
        percdamp: float = 0.01,
        finetune_steps: int = 0,
        finetune_lr: float = 5e-4,
        finetune_batch_size: int = 64,
        p_uncond: float = 0.1,
        ema_decay: float = 0.0,
        hflip: bool = False,
        finetune_dropout: float | None = None,
        save: bool = True,
        name: str = "diff_pruning",
        tag: str | None = None,
    ):
        super().__init__(keep_backup=False)
        self.name, self.tag = name, tag or name
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError("method.sparsity", f"must be in [0, 1), got {sparsity}.")
        if importance not in IMPORTANCES:
            raise ConfigError("method.importance", f"unknown {importance!r}.", IMPORTANCES)
        if obs_mode not in OBS_MODES:
            raise ConfigError("method.obs_mode", f"unknown {obs_mode!r}.", OBS_MODES)
        if obs_weighting not in WEIGHTINGS:
            raise ConfigError("method.obs_weighting", f"unknown {obs_weighting!r}.", WEIGHTINGS)
        for key, v in (("thr", thr), ("ema_decay", ema_decay)):
            if not 0.0 <= float(v) < 1.0:
                raise ConfigError(f"method.{key}", f"must be in [0, 1), got {v}.")
        for key, v in (("batch_size", batch_size), ("t_stride", t_stride),
                       ("finetune_batch_size", finetune_batch_size), ("obs_images", obs_images),
                       ("obs_timesteps", obs_timesteps), ("obs_batch_size", obs_batch_size),
                       ("magnitude_p", magnitude_p)):
            if int(v) < 1:
                raise ConfigError(f"method.{key}", f"must be >= 1, got {v}.")
        if int(finetune_steps) < 0:
            raise ConfigError("method.finetune_steps", f"must be >= 0, got {finetune_steps}.")
        if float(percdamp) <= 0:
            raise ConfigError("method.percdamp", f"must be > 0, got {percdamp}.")
        self.sparsity, self.thr, self.importance = float(sparsity), float(thr), importance
        self.magnitude_p = int(magnitude_p)
        self.batch_size, self.t_stride, self.num_heads = int(batch_size), int(t_stride), num_heads
        self.obs_update, self.obs_mode = bool(obs_update), obs_mode
        self.obs_images = int(obs_images)
        self.obs_timesteps, self.obs_batch_size = int(obs_timesteps), int(obs_batch_size)
        self.obs_weighting, self.percdamp = obs_weighting, float(percdamp)
        self.finetune_steps, self.finetune_lr = int(finetune_steps), float(finetune_lr)
        self.finetune_batch_size, self.p_uncond = int(finetune_batch_size), float(p_uncond)
        self.ema_decay, self.hflip = float(ema_decay), bool(hflip)
        if finetune_dropout is not None and not 0.0 <= float(finetune_dropout) < 1.0:
            raise ConfigError("method.finetune_dropout", f"must be in [0, 1) or null, got "
                              f"{finetune_dropout}.")
        self.finetune_dropout = None if finetune_dropout is None else float(finetune_dropout)
        self.save = bool(save)

    def check(self, family: str) -> None:
        if family not in self.supported_families:
            raise UnsupportedFamily(
                f"<method={self.name}> needs training images and a fine-tuning loop; edm has them "
                f"for the embedded digits model and the DDPM UNets (family 'ddpm': "
                f"model=ddpm_cifar10 with CIFAR-10, model=tiny_ddpm), not for {family!r}."
            )

    def training_data(self, pipe, ctx: ApplyContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0 in [-1, 1] ``[N, C, H, W]``, the UNet text keywords (``finetune.text_cond``: states
        ``[N, L, D]``, plus the padding mask of a ``mask_padding`` model) or ``None`` for an
        unconditional model) on the UNet's device. ``ctx.train_data()`` (the loader's) returns
        images in [0, 1] and their prompts (``None``: unconditional)."""
        if ctx.train_data is not None:
            images, prompts = ctx.train_data()
        elif ctx.family == "digits":  # the digits training split ships with scikit-learn
            from edm.digits.data import TRAIN_TEMPLATES, digit_images, digit_prompt

            images, labels = digit_images("train")
            prompts = [digit_prompt(int(y), TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)])
                       for i, y in enumerate(labels)]
        else:
            raise ConfigError("model.loader", f"<method={self.name}> needs training images, and "
                              f"this {ctx.family!r} loader offers none (no train_data()).")
        images = torch.as_tensor(images, dtype=torch.float32)
        x0 = images * 2 - 1 if images.min() >= 0 else images  # [0, 1] -> [-1, 1]
        unet = pipe.unet
        return x0.to(unet.device, unet.dtype), text_cond(pipe, prompts)

    def build_pruner(self, unet: nn.Module, example: dict, use_heads: bool):
        import torch_pruning as tp

        imp = {"taylor": lambda: tp.importance.TaylorImportance(multivariable=False),
               "magnitude": lambda: tp.importance.MagnitudeImportance(p=self.magnitude_p),
               "random": lambda: tp.importance.RandomImportance()}[self.importance]()
        return tp.pruner.MetaPruner(
            unet, example, importance=imp, pruning_ratio=self.sparsity, iterative_steps=1,
            ignored_layers=[unet.conv_out], num_heads=attention_heads(unet) if use_heads else {},
            output_transform=lambda out: out.sample,
        )

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        unet = pipe.unet
        t0 = time.perf_counter()
        x_all, ctx_all = self.training_data(pipe, ctx)
        g = torch.Generator().manual_seed(int(ctx.seed))
        idx = torch.randperm(len(x_all), generator=g)[: self.batch_size]
        x0 = x_all[idx]
        context = None if ctx_all is None else cond_rows(ctx_all, idx)
        params_before = sum(p.numel() for p in unet.parameters())
        shapes_before = {n: p.shape for n, p in unet.named_parameters()}
        was_training = unet.training
        unet.eval()  # no dropout in the importance pass
        grads = {"timesteps_used": 0}
        if self.importance == "taylor":
            grads = accumulate_gradients(unet, pipe.scheduler, x0, context, self.thr, g, self.t_stride)
        example = {"sample": x0[:1], "timestep": torch.zeros(1, dtype=torch.long, device=x0.device),
                   **cond_rows(context, slice(0, 1))}
        dense = None
        if self.obs_update:  # the update needs the dense weights and activations (see _obs)
            dense = copy.deepcopy(unet).requires_grad_(False)
            dense.zero_grad(set_to_none=True)
        unet.requires_grad_(True)  # torch-pruning traces the graph through autograd
        pruner = self.build_pruner(unet, example, bool(self.num_heads))
        recorder = MaskRecorder(unet, pruner.DG)
        for group in pruner.step(interactive=True):
            recorder.record(group)  # before prune(): its indices are in the current shapes
            group.prune()
        unet.zero_grad(set_to_none=True)
        repaired = repair_static_attributes(unet)
        obs = self._obs(unet, dense, recorder, pipe, ctx, x_all, ctx_all) if dense is not None \
            else None
        del dense
        prune_seconds = time.perf_counter() - t0
        empty = text_cond(pipe, [""]) if ctx_all is not None else None
        ft = finetune(unet, pipe.scheduler, x_all, ctx_all, steps=self.finetune_steps,
                      lr=self.finetune_lr, batch_size=self.finetune_batch_size,
                      p_uncond=self.p_uncond, empty_ctx=empty, generator=g,
                      ema_decay=self.ema_decay, hflip=self.hflip, dropout=self.finetune_dropout)
        unet.train(was_training)
        params_after = sum(p.numel() for p in unet.parameters())
        details = {"gradient_pass": {k: v for k, v in grads.items() if k != "losses"},
                   "losses": grads.get("losses", []), "repaired_modules": repaired,
                   "finetune": ft, "num_heads_passed": bool(self.num_heads),
                   "importance": self.importance, "obs_update": obs,
                   "kept_channels": {f"{n}:{d}": k for (n, d), k in recorder.kept.items()}}
        if self.save:
            details["saved_to"] = save_to_run(unet, ctx, {"method": self.name,
                                                         "sparsity": self.sparsity,
                                                         "obs_update": self.obs_update,
                                                         "obs_mode": self.obs_mode})
        metrics = {
            **param_change(params_before, params_after),
            "timesteps_used": float(grads["timesteps_used"]),
            "prune_seconds": prune_seconds, "finetune_seconds": ft["seconds"],
            "finetune_steps": float(self.finetune_steps),
        }
        if obs is not None:
            metrics.update(obs_error_zero=obs["error_zero"], obs_error=obs["error_obs"],
                           obs_error_ratio=obs["error_ratio"], obs_seconds=obs["seconds"],
                           obs_layers=float(len(obs["layers"])))
        if ft["final_loss"] is not None:
            metrics["finetune_loss"] = ft["final_loss"]
        changed = {n.rpartition(".")[0] for n, p in unet.named_parameters()
                   if p.shape != shapes_before.get(n)}
        details["changed_modules"] = len(changed)
        # torch-pruning, not the package loop: no PackageRun; the sparsity is the parameters gone
        return build_report(self, unet.device, patched=len(changed),
                            sparsity=1 - params_after / params_before, metrics=metrics,
                            details=details)

    def _obs(self, unet, dense, recorder, pipe, ctx, x_all, ctx_all) -> dict:
        """The OBS update on its own generator, so fine-tuning draws the same batches with and
        without it (the two runs then differ only by the update)."""
        gc = torch.Generator().manual_seed(int(ctx.seed) + 1)
        idx = torch.randperm(len(x_all), generator=gc)[: self.obs_images]
        steps = int((ctx.gen or {}).get("num_inference_steps") or 25)
        return obs_update(unet, dense, recorder, pipe.scheduler, x_all[idx],
                   None if ctx_all is None else cond_rows(ctx_all, idx), mode=self.obs_mode,
                   num_inference_steps=steps,
                   num_timesteps=self.obs_timesteps, weighting=self.obs_weighting,
                   batch_size=self.obs_batch_size, percdamp=self.percdamp, generator=gc)

"""Diff-Pruning + OBS update (OBS-Diff Table 10): where the update of ``conv_obs`` is applied.

"OBS-Diff reuses Diff-Pruning's column masks and adds the OBS weight update of Eq. 6" (spec
§2.8). torch-pruning removes channels group by group; each removed channel is an output channel
of its *producers* (rows: nothing to compensate) and an input channel of its *consumers* (the
next convolutions, the attention q/k/v and shortcut layers reading it). Only consumers change.

Order, chosen so the masks are exactly Diff-Pruning's (``tests/test_ddpm.py`` checks):

1. the dense UNet is copied before pruning;
2. torch-pruning prunes as usual; :class:`MaskRecorder` notes, before each ``group.prune()``, the
   *original* indices every Conv2d/Linear loses (pruning is interactive, so later groups are
   indexed in already-pruned layers: a concatenation's consumer is cut by two groups);
3. calibration: noised training images at the sampler's timesteps, OBS-Diff's log-decrease
   weights per timestep (:func:`calibration_batches`);
4. every consumer gets its update (``obs_mode``):

   * ``dense`` -- the OBS update of Eq. 6 with the Hessian of the consumer's input in the dense
     model, all consumers from one pass (:func:`collect_hessians`, :func:`compensate`). This is
     the paper's sentence taken literally; it assumes every other input of the layer is as in
     the dense model.
   * ``sequential`` (default) -- consumers in forward order, each refit to its dense output on
     the inputs the pruned, already-compensated network gives it (``conv_obs.refit_to_dense``;
     the OBS update itself when those inputs are unchanged), one truncated calibration pass
     per unit (:func:`sequential_refit`). Measured on the digits model (issue 12): pruning also
     shifts the *kept* inputs -- GroupNorm renormalises the channels left in each group, and
     upstream layers change -- so ``dense`` cuts each layer's own error ~14x but the network's
     little (digit FID 81 -> 33, prompt accuracy 0.23 -> 0.17 before fine-tuning), while
     ``sequential`` gives FID 14 / accuracy 0.90 (``experiments/results/digits_table10.md``).

No weight changes before the last group is pruned, so importance scores -- computed lazily per
group from the current weights -- cannot see the update.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from edm.methods.weight.conv_obs import (
    channel_columns,
    consumer_input,
    obs_remove_columns,
    output_error,
    reconstruction_error,
    refit_to_dense,
    zero_columns,
)
from edm.methods.weight.finetune import cond_rows
from edm.methods.weight.hessian import HessianStat, timestep_weights

log = logging.getLogger(__name__)

OBS_MODES = ("sequential", "dense")


class MaskRecorder:
    """Original channel indices each Conv2d/Linear keeps, recorded while torch-pruning prunes.

    Call :meth:`record` with every group *before* ``group.prune()``. ``kept[(name, dim)]`` is the
    list of original indices still present (``dim`` = ``"out"`` rows / ``"in"`` columns).
    """

    def __init__(self, model: nn.Module, dependency_graph):
        self.names = {m: n for n, m in model.named_modules()}
        self.graph = dependency_graph
        self.kept: dict[tuple[str, str], list[int]] = {}
        self.sizes = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))}

    def record(self, group) -> None:
        for dep, idxs in group.items:
            m = dep.target.module
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or m not in self.names:
                continue
            dim = "out" if self.graph.is_out_channel_pruning_fn(dep.handler) else "in"
            key = (self.names[m], dim)
            size = self.sizes[key[0]][0 if dim == "out" else 1]
            alive = self.kept.setdefault(key, list(range(size)))
            gone = {alive[int(getattr(i, "idx", i))] for i in idxs}  # current -> original
            self.kept[key] = [i for i in alive if i not in gone]

    def removed_inputs(self) -> dict[str, list[int]]:
        """``{consumer name: original input channels removed}`` for every layer that lost some."""
        out = {}
        for (name, dim), alive in self.kept.items():
            if dim == "in" and len(alive) < self.sizes[name][1]:
                out[name] = sorted(set(range(self.sizes[name][1])) - set(alive))
        return out

    def keep(self, name: str, dim: str) -> list[int]:
        size = self.sizes[name][0 if dim == "out" else 1]
        return self.kept.get((name, dim), list(range(size)))


def calib_timesteps(scheduler, num_inference_steps: int, k: int) -> list[int]:
    """``k`` of the sampler's own timesteps, evenly spread, noisiest first."""
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates the pipeline's scheduler
    sched.set_timesteps(int(num_inference_steps))
    ts = [int(t) for t in sched.timesteps]
    if k >= len(ts):
        return ts
    pick = torch.linspace(0, len(ts) - 1, k).round().long().tolist()
    return [ts[i] for i in pick]


def calibration_batches(scheduler, x0: torch.Tensor, context: dict | None,
                        timesteps: list[int], weighting: str, batch_size: int,
                        generator: torch.Generator) -> list[tuple]:
    """``(x_t, t, unet kwargs, alpha)`` per batch: every image noised to every timestep with one
    fixed ``eps`` per image (``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``); step ``i`` (0 =
    noisiest) weighs ``timestep_weights(weighting)[i]``. A list, so every pass sees the same."""
    weights = timestep_weights(weighting, len(timesteps)).tolist()
    a_bar = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    out = []
    for t, w in zip(timesteps, weights):
        for i in range(0, len(x0), batch_size):
            xb = x0[i : i + batch_size]
            xt = a_bar[t].sqrt() * xb + (1 - a_bar[t]).sqrt() * noise[i : i + batch_size]
            tt = torch.full((len(xb),), t, device=x0.device, dtype=torch.long)
            kw = cond_rows(context, slice(i, i + batch_size))
            out.append((xt, tt, kw, float(w)))
    return out


class _Stop(Exception):
    """Raised by a hook once the layers of interest have run: the rest of the forward is waste."""


def _forward(model: nn.Module, batch) -> None:
    xt, tt, kw, _ = batch
    try:
        model(xt, tt, **kw)
    except _Stop:
        pass


@torch.no_grad()
def collect_hessians(dense: nn.Module, names: list[str], batches: list) -> dict[str, HessianStat]:
    """``dense`` mode: input Hessians of the consumers ``names`` of the dense model, one pass."""
    modules = dict(dense.named_modules())
    stats: dict[str, HessianStat] = {}
    alpha = [1.0]

    def hook_for(name):
        def hook(module, args, output):
            x = consumer_input(module, args[0])
            if name not in stats:
                stats[name] = HessianStat(x.shape[-1], device=x.device)
            stats[name].update(x, alpha[0])
        return hook

    hooks = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        for batch in batches:
            alpha[0] = batch[3]
            _forward(dense, batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def compensate(pruned: nn.Module, dense: nn.Module, recorder: MaskRecorder,
               stats: dict[str, HessianStat], percdamp: float = 0.01) -> dict:
    """Write the OBS-updated, torch-pruning-sliced weight into every consumer of ``pruned``.

    Returns per-layer and total reconstruction errors (``trace(D H D^T)`` with the normalised
    Hessian) of the update-free pruning (removed columns zeroed) and of the OBS update.
    """
    pmods, dmods = dict(pruned.named_modules()), dict(dense.named_modules())
    layers, tot_zero, tot_obs = {}, 0.0, 0.0
    for name, channels in recorder.removed_inputs().items():
        if name not in stats:  # a consumer the calibration never reached (not on this path)
            log.warning("OBS update: %s got no calibration input; left as pruned", name)
            continue
        Wd = dmods[name].weight
        group = Wd[0, 0].numel()  # kh * kw for a conv, 1 for a linear
        W = Wd.reshape(Wd.shape[0], -1)
        cols = channel_columns(channels, group).to(W.device)
        H = stats[name].H
        W_obs = obs_remove_columns(W, H, cols, percdamp)
        e_zero = reconstruction_error(W, zero_columns(W, cols), H)
        e_obs = reconstruction_error(W, W_obs, H)
        rows = torch.tensor(recorder.keep(name, "out"), device=W.device)
        keep_in = torch.tensor(recorder.keep(name, "in"), device=W.device)
        new = W_obs.view_as(Wd)[rows][:, keep_in]
        target = pmods[name].weight
        assert new.shape == target.shape, f"{name}: {tuple(new.shape)} vs {tuple(target.shape)}"
        target.data.copy_(new.to(target.dtype))
        layers[name] = {"removed": len(channels), "error_zero": e_zero, "error_obs": e_obs}
        tot_zero, tot_obs = tot_zero + e_zero, tot_obs + e_obs
    return {"layers": layers, "error_zero": tot_zero, "error_obs": tot_obs,
            "error_ratio": tot_obs / tot_zero if tot_zero > 0 else 1.0}


class _Moments:
    """Weighted running means of ``X^T X`` (dense input), ``X_hat^T X`` and ``X_hat^T X_hat``."""

    def __init__(self):
        self.H = self.C = self.H_hat = None
        self.weight = 0.0

    def update(self, X: torch.Tensor, X_hat: torch.Tensor, alpha: float) -> None:
        X = X.reshape(-1, X.shape[-1]).float()
        X_hat = X_hat.reshape(-1, X_hat.shape[-1]).float()
        w = alpha * X.shape[0]
        total = self.weight + w
        keep, add = self.weight / total, alpha / total
        if self.H is None:
            self.H, self.C, self.H_hat = X.T @ X * add, X_hat.T @ X * add, X_hat.T @ X_hat * add
        else:
            self.H.mul_(keep).addmm_(X.T, X, alpha=add)
            self.C.mul_(keep).addmm_(X_hat.T, X, alpha=add)
            self.H_hat.mul_(keep).addmm_(X_hat.T, X_hat, alpha=add)
        self.weight = total


def forward_units(model: nn.Module, names: list[str], batch) -> list[list[str]]:
    """``names`` in the order they run; consecutive layers reading the same tensor object
    (attention q/k/v) form one unit, refit together: none of them feeds another. The probe keeps
    every input alive, so a freed buffer's address reused by a later input (same ``data_ptr``,
    a different tensor) cannot merge a layer with the one it feeds."""
    modules = dict(model.named_modules())
    order: list[tuple[str, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, args, output):
            if all(n != name for n, _ in order):
                order.append((name, args[0]))
        return hook

    hooks = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            _forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    units: list[list[str]] = []
    for i, (name, x) in enumerate(order):
        if i and x is order[i - 1][1]:
            units[-1].append(name)
        else:
            units.append([name])
    return units


def _unit_moments(pmods: dict, dmods: dict, unit: list[str], batches: list) -> dict:
    """The moments of one unit's dense and pruned inputs, over every calibration batch; both
    forwards stop once the unit has run."""
    moments = {n: _Moments() for n in unit}
    dense_in: dict[str, torch.Tensor] = {}
    alpha = [1.0]

    def dense_hook(name, last):
        def hook(module, args, output):
            dense_in[name] = consumer_input(module, args[0])
            if last:
                raise _Stop
        return hook

    def pruned_hook(name, last):
        def hook(module, args, output):
            moments[name].update(dense_in.pop(name), consumer_input(module, args[0]), alpha[0])
            if last:
                raise _Stop
        return hook

    hooks = [dmods[n].register_forward_hook(dense_hook(n, n == unit[-1])) for n in unit]
    hooks += [pmods[n].register_forward_hook(pruned_hook(n, n == unit[-1])) for n in unit]
    try:
        for batch in batches:  # the same inputs through both networks, up to this unit
            alpha[0] = batch[3]
            _forward(dmods[""], batch)
            _forward(pmods[""], batch)
    finally:
        for h in hooks:
            h.remove()
    return moments


@torch.no_grad()
def sequential_refit(pruned: nn.Module, dense: nn.Module, recorder: MaskRecorder, batches: list,
                     percdamp: float = 0.01) -> dict:
    """``sequential`` mode: each unit of consumers, in forward order, refit to the dense output on
    the inputs of the pruned network as compensated so far (``conv_obs.refit_to_dense``)."""
    pmods, dmods = dict(pruned.named_modules()), dict(dense.named_modules())
    removed = recorder.removed_inputs()
    units = forward_units(dense, list(removed), batches[0])
    layers, tot_zero, tot_obs = {}, 0.0, 0.0
    for unit in units:
        moments = _unit_moments(pmods, dmods, unit, batches)
        for n in unit:
            Wd = dmods[n].weight
            group = Wd[0, 0].numel()  # kh * kw for a conv, 1 for a linear
            rows = torch.tensor(recorder.keep(n, "out"), device=Wd.device)
            W = Wd.reshape(Wd.shape[0], -1)[rows].float()
            keep = channel_columns(recorder.keep(n, "in"), group).to(Wd.device)
            mo = moments[n]
            V = refit_to_dense(W, mo.C, mo.H_hat, keep, percdamp)
            e_zero = output_error(W, W[:, keep], mo.H, mo.C, mo.H_hat)
            e_obs = output_error(W, V, mo.H, mo.C, mo.H_hat)
            target = pmods[n].weight
            target.data.copy_(V.view_as(target).to(target.dtype))
            layers[n] = {"removed": len(removed[n]), "error_zero": e_zero, "error_obs": e_obs}
            tot_zero, tot_obs = tot_zero + e_zero, tot_obs + e_obs
    return {"layers": layers, "units": len(units), "error_zero": tot_zero, "error_obs": tot_obs,
            "error_ratio": tot_obs / tot_zero if tot_zero > 0 else 1.0}


def obs_update(pruned: nn.Module, dense: nn.Module, recorder: MaskRecorder, scheduler,
               x0: torch.Tensor, context: dict | None, *, mode: str = "sequential",
               num_inference_steps: int, num_timesteps: int, weighting: str, batch_size: int,
               percdamp: float, generator: torch.Generator) -> dict:
    """Steps 3-4 of the module docstring; returns the per-layer and total errors + timing."""
    t0 = time.perf_counter()
    timesteps = calib_timesteps(scheduler, num_inference_steps, num_timesteps)
    batches = calibration_batches(scheduler, x0, context, timesteps, weighting, batch_size,
                                  generator)
    was = pruned.training, dense.training
    pruned.eval(), dense.eval()
    try:
        if mode == "dense":
            stats = collect_hessians(dense, list(recorder.removed_inputs()), batches)
            out = compensate(pruned, dense, recorder, stats, percdamp)
            out["hessian_mb"] = sum(s.nbytes() for s in stats.values()) / 2**20
        else:
            out = sequential_refit(pruned, dense, recorder, batches, percdamp)
    finally:
        pruned.train(was[0]), dense.train(was[1])
    out.update(mode=mode, timesteps=timesteps, images=len(x0), seconds=time.perf_counter() - t0)
    log.info("OBS update (%s) of %d consumers: reconstruction error %.4g -> %.4g (x%.3f), %.1fs",
             mode, len(out["layers"]), out["error_zero"], out["error_obs"], out["error_ratio"],
             out["seconds"])
    return out

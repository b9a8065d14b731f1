"""Save and reload pruned denoisers without pickling modules.

Structured pruning (OBS-Diff structured, L1, Diff-Pruning) changes tensor shapes, so the
diffusers config no longer describes the model; the reference code falls back to
``torch.save(module)``, which ties a checkpoint to the exact class code. Here a pruned model is a
folder with

* ``denoiser.safetensors`` -- the full ``state_dict`` (tensors only);
* ``pruned.json`` -- the denoiser class, the base diffusers config, the family, every tensor's
  shape, and the static integer attributes that forward code reads (``attn.heads``,
  ``Linear.out_features``, ``Upsample2D.channels``...), plus free-form ``meta``.

Loading rebuilds the base architecture (or takes an already loaded one), gives every tensor its
saved shape, restores the attributes, then loads the weights strictly. ``model.pruned_from=<dir>``
makes the runner call :func:`apply_pruned_from` right after loading the pipeline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edm.errors import ConfigError
from edm.io import write_json

log = logging.getLogger(__name__)

FORMAT = "edm-pruned/1"
WEIGHTS_FILE = "denoiser.safetensors"
CONFIG_FILE = "pruned.json"

# Instance attributes (ints or int tuples) that modules read in forward or use to build views.
_ATTRS = (
    "in_features", "out_features", "in_channels", "out_channels", "num_channels",
    "normalized_shape", "num_features", "heads", "inner_dim", "inner_kv_dim",
    "sliceable_head_dim", "channels", "out_dim", "query_dim", "cross_attention_dim",
    # FLUX single-stream blocks: the MLP width, and proj_out's [attention | MLP] column split
    "mlp_hidden_dim", "_tp_packed_row_blocks",
)


def _is_intlike(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, int) for x in v)


def module_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Whitelisted integer attributes set on each module instance (not diffusers config keys)."""
    out = {}
    for name, m in model.named_modules():
        found = {a: vars(m)[a] for a in _ATTRS if a in vars(m) and _is_intlike(vars(m)[a])}
        if found:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()}
    return out


def save_pruned(
    denoiser: nn.Module, out_dir: str | Path, family: str | None = None, meta: dict | None = None
) -> Path:
    """Write ``denoiser.safetensors`` and ``pruned.json`` to ``out_dir``.

    Args:
        denoiser: the (pruned) ``pipe.unet`` / ``pipe.transformer``.
        out_dir: folder to create or overwrite.
        family: model family, checked when loading into a pipeline.
        meta: anything JSON-serialisable to keep alongside (method, sparsity, report).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in denoiser.state_dict().items()}
    config = json.loads(denoiser.to_json_string()) if hasattr(denoiser, "to_json_string") else None
    save_file(state, str(out / WEIGHTS_FILE))
    write_json(out / CONFIG_FILE, {
        "format": FORMAT,
        "class": type(denoiser).__name__,
        "family": family,
        "base_config": config,
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "attrs": module_attrs(denoiser),
        "params": sum(p.numel() for p in denoiser.parameters()),
        "meta": meta or {},
    })
    log.info("saved pruned denoiser to %s", out)
    return out


def save_to_run(denoiser: nn.Module, ctx, meta: dict | None = None) -> str | None:
    """Save a structurally pruned denoiser to ``<ctx.output_dir>/pruned_model`` (if the run has
    an output dir), so that ``model.pruned_from=<that dir>`` reloads it; returns the path."""
    if getattr(ctx, "output_dir", None) is None:
        return None
    return str(save_pruned(denoiser, Path(ctx.output_dir) / "pruned_model", ctx.family, meta))


def read_spec(out_dir: str | Path) -> dict:
    """The ``pruned.json`` of a pruned-model folder; ConfigError if it is not one."""
    d = Path(out_dir)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise ConfigError(
            "model.pruned_from", f"{d} is not a pruned-model folder (needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, written by edm.methods.weight.io.save_pruned)."
        )
    spec = json.loads((d / CONFIG_FILE).read_text())
    if spec.get("format") != FORMAT:
        raise ConfigError("model.pruned_from", f"unknown format {spec.get('format')!r} in {d}.",
                          [FORMAT])
    return spec


def _resize(model: nn.Module, shapes: dict[str, list[int]]) -> int:
    """Give every parameter / buffer its saved shape (uninitialised); returns how many changed."""
    changed = 0
    for key, shape in shapes.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        cur = getattr(mod, attr, None)
        if cur is None:
            raise ConfigError("model.pruned_from", f"saved tensor {key!r} has no counterpart")
        if list(cur.shape) == list(shape):
            continue
        new = torch.empty(shape, dtype=cur.dtype, device=cur.device)
        if isinstance(cur, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            mod.register_buffer(attr, new, persistent=True)
        changed += 1
    return changed


def _set_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        if name not in modules:
            raise ConfigError("model.pruned_from", f"saved module {name!r} not in the base model")
        for k, v in values.items():
            setattr(modules[name], k, tuple(v) if isinstance(v, list) else v)


def load_pruned(base: nn.Module | dict | Callable[[], nn.Module], out_dir: str | Path) -> nn.Module:
    """Rebuild a pruned denoiser.

    Args:
        base: the dense denoiser to reshape in place (e.g. ``pipe.unet`` as loaded), a callable
            building one, or ``None``/a config dict: then the class named in ``pruned.json`` is
            built with ``from_config`` (the saved base config when ``base`` is ``None``).
        out_dir: folder written by :func:`save_pruned`.

    Returns:
        The denoiser with the pruned shapes and weights.
    """
    from safetensors.torch import load_file

    spec = read_spec(out_dir)
    if base is None or isinstance(base, dict):
        import diffusers

        cls = getattr(diffusers, spec["class"])
        model = cls.from_config(base if isinstance(base, dict) else spec["base_config"])
    elif isinstance(base, nn.Module):
        model = base
    else:
        model = base()
    if type(model).__name__ != spec["class"]:
        raise ConfigError("model.pruned_from", f"{out_dir} holds a {spec['class']}, the model "
                          f"is a {type(model).__name__}.")
    changed = _resize(model, spec["shapes"])
    _set_attrs(model, spec["attrs"])
    device = next(model.parameters()).device
    state = load_file(str(Path(out_dir) / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state, strict=True)
    log.info("loaded pruned denoiser from %s (%d tensors reshaped)", out_dir, changed)
    return model


def apply_pruned_from(pipe, out_dir: str | Path) -> dict:
    """Runner hook for ``model.pruned_from=<dir>``: load a pruned denoiser into ``pipe``.

    The pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) is reshaped in place and
    loaded with the saved weights, in the pipeline's dtype and device.

    Returns:
        ``{"pruned_from", "params", "meta"}`` for logging.
    """
    from edm.families import adapter, family_of

    spec = read_spec(out_dir)
    family = family_of(pipe)
    if spec.get("family") and spec["family"] != family:
        raise ConfigError("model.pruned_from", f"{out_dir} was pruned from a {spec['family']!r} "
                          f"model, the run loads {family!r}.")
    denoiser = load_pruned(adapter(pipe).denoiser(pipe), out_dir)
    params = sum(p.numel() for p in denoiser.parameters())
    return {"pruned_from": str(out_dir), "params": params, "meta": spec.get("meta", {})}

"""What a run records about itself: provenance, protocol and what the method was asked for.

``metrics.json`` (written by :mod:`edm.runner`) and the W&B run get the same facts from here, so
``experiments/tables.py`` can match either to a paper's rows.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

PROVENANCE_KEYS = ("model", "method", "gen", "sparsity", "seed")


def _flat(node, prefix="") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def flat_config(resolved: dict) -> dict:
    """The config values tables match runs on (``run.config`` of metrics.json and of W&B
    records alike): model/method/gen/sparsity/seed flattened to dotted keys, without loader
    paths and ``_target_`` class names."""
    flat = _flat({k: resolved[k] for k in PROVENANCE_KEYS if k in resolved})
    return {k: v for k, v in flat.items() if not k.startswith("model.loader") and "_target_" not in k}


def _hydra_runtime():
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:  # run() called without Hydra (tests, notebooks)
        return None


def provenance(cfg: DictConfig) -> dict:
    """Group choices and CLI overrides (for tables that match results to paper rows)."""
    hc = _hydra_runtime()
    choices = ({k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
               if hc is not None else {})
    overrides = list(hc.overrides.task) if hc is not None else []
    return {"choices": choices, "overrides": overrides,
            "config": flat_config(OmegaConf.to_container(cfg, resolve=True))}


def tracker_config(cfg: DictConfig) -> dict:
    """The config a tracker run gets: the resolved config plus ``provenance`` (group choices and
    CLI overrides), which the config alone lacks (``method=tome_c`` resolves to
    ``method.name=tome``) and experiments/tables.py needs to match W&B runs to paper rows."""
    prov = provenance(cfg)
    return {**OmegaConf.to_container(cfg, resolve=True),
            "provenance": {k: prov[k] for k in ("choices", "overrides")}}


def generation_protocol(cfg: DictConfig, pipe=None) -> dict:
    """How the images were made, for tables that compare with a paper's protocol: steps, CFG,
    size and the sampler actually installed (the loaded pipeline's, else the configured one)."""
    sched = type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else \
        cfg.model.loader.get("scheduler")
    hc = _hydra_runtime()
    return {"name": hc.runtime.choices.get("protocol") if hc is not None else None,
            "num_inference_steps": int(cfg.gen.num_inference_steps),
            "guidance_scale": float(cfg.gen.guidance_scale), "height": int(cfg.gen.height),
            "width": int(cfg.gen.width), "scheduler": sched}


def requested_sparsity(cfg: DictConfig) -> float | None:
    """The global ``sparsity`` if the composed method uses it (``${sparsity}`` in its config),
    else ``None``: token methods have their own ratio knobs and ignore it."""
    nodes = [cfg.method] + ([cfg.then] if cfg.get("then") else [])
    text = "".join(OmegaConf.to_yaml(n, resolve=False) for n in nodes)
    return float(cfg.sparsity) if "${sparsity}" in text else None


def sparsity_was_set(cfg: DictConfig) -> bool:
    """``sparsity=...`` was given on the command line (a warning if the method ignores it)."""
    return any(o.lstrip("+~").split("=")[0] == "sparsity" for o in provenance(cfg)["overrides"])

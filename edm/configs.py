"""The project's Hydra config, composed from Python exactly as ``run.py`` composes it.

Experiment scripts and notebooks that need a method or a model config call :func:`compose`
instead of merging YAML files by hand, so they cannot drift from what a run uses (defaults
lists, ``model_method/`` specialisations, interpolations).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str) -> DictConfig:
    """``python run.py <overrides>``'s job config (without the ``hydra`` node).

    ``${hydra:...}`` interpolations resolve, because Hydra's config is registered first.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def method(*overrides: str):
    """The :class:`~edm.methods.base.Method` a run with these overrides would apply, e.g.
    ``method("model=sdxl", "method=at_edm_c")`` (the model matters: ``model_method/``)."""
    from edm.runner import build_method

    return build_method(compose(*overrides))

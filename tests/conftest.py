"""Test setup: fully offline, deterministic, small.

HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are set before diffusers/transformers are imported, so an
accidental ``from_pretrained`` fails the test instead of trying the network. W&B is disabled.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")


# Tiny models are dominated by per-op overhead, which extra threads only add to (and results
# depend on the thread count); one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the project config as the CLI would, with outputs under ``tmp_path``.

    Usage: ``cfg = compose_cfg("model=tiny_sd15", "method=tome")``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.gen.progress = False
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()

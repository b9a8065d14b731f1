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


def _tiny_digits():
    """A randomly initialised digits-preset pipeline (the shipped weights are not needed)."""
    from edm.digits.components import build_components, default_config
    from edm.digits.pipeline import DigitsPipeline

    pipe = DigitsPipeline(**build_components(default_config("small"), seed=0))
    pipe.edm_family = "digits"
    return pipe


@pytest.fixture(scope="module")
def tiny_pipes():
    """Tiny random pipelines of every family (``edm.models.tiny``, digits preset), built once per
    test module from seeded configs. Tests that change one restore it (``remove``) or deep-copy."""
    from edm.models.tiny import tiny_sd3, tiny_sd15, tiny_sdxl

    out = {"sd15": tiny_sd15(), "sdxl": tiny_sdxl(), "sd3": tiny_sd3(), "digits": _tiny_digits()}
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


@pytest.fixture
def compose_job():
    """``compose_job(overrides, hydra_cfg=False)``: the project config for ``overrides``, as the
    CLI composes it (with the ``hydra`` node when ``hydra_cfg``, e.g. for sweeper params)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides, hydra_cfg: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)

    yield _compose
    GlobalHydra.instance().clear()


HF_SNAPSHOT = "0" * 40  # the fake hub cache's snapshot hash


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache that edm's resolvers read; returns ``put(repo, name, bytes)``."""
    import huggingface_hub.constants as c

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))

    def put(repo: str, name: str, data: bytes):
        d = root / ("models--" + repo.replace("/", "--"))
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs" / "main").write_text(HF_SNAPSHOT)
        p = d / "snapshots" / HF_SNAPSHOT / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    return put


@pytest.fixture
def forbid_model_loading(monkeypatch):
    """Any model loader's ``load()`` fails the test: for bad configs that must be rejected
    before a model loads (every loader is built by the runner's ``instantiate``)."""
    import edm.runner as R

    real = R.instantiate

    def guarded(node, *a, **k):  # any model loader's load() would be a failure here
        obj = real(node, *a, **k)
        if type(obj).__name__.endswith(("Loader", "Pipeline")):
            obj.load = lambda *a, **k: pytest.fail("model loaded despite a bad config")
        return obj

    monkeypatch.setattr(R, "instantiate", guarded)


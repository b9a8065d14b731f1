"""Build FID reference statistics once, from the same configs a run uses.

    python -m edm.eval.precompute data=coco2014 data.root=/data/coco      # -> coco2014_val512
    python -m edm.eval.precompute data=coco2017 data.root=/data/coco eval=paper_atedm
                                                                  # -> coco2017_val1024
    python -m edm.eval.precompute data=coco2014 eval.fid.reference_images=/imgs --overwrite
    python -m edm.eval.precompute eval=fid_cifar10 eval.fid.reference_images=/data/cifar-10-batches-py
                                                                  # -> cifar10_train32 (50 K)

Arguments are Hydra overrides of the project config (``conf/``); ``eval=fid`` is added when no
``eval=`` is given. The stats land in ``eval.fid.cache_dir`` as ``<reference>_<mode>.npz``, the
file later runs' ``FID.check()`` looks for. Real images come from ``eval.fid.reference_images`` or
``<data.root>/<data.split><data.year>`` (e.g. ``/data/coco/val2014``); CIFAR-10's python batches
(``cifar-10-batches-py``) are unpacked to PNGs in ``eval.fid.cache_dir`` first.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from edm.errors import ConfigError

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str]) -> DictConfig:
    """The project config with ``overrides`` (``eval=fid`` added when no eval group is chosen)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not any(o.split("=", 1)[0].lstrip("+~") == "eval" for o in overrides):
        overrides = [*overrides, "eval=fid"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def reference_images_dir(cfg: DictConfig) -> Path:
    """Folder of real images for ``cfg.eval.fid``, checked against the data config."""
    from edm.eval.fid import Reference

    fid = cfg.eval.fid
    ref = Reference.parse(fid.reference)
    if fid.get("reference_images"):
        return Path(fid.reference_images).expanduser()
    if ref.dataset == "cifar10":  # no caption data set: the images come from the batches folder
        from edm.models.cifar10 import check_cifar10

        check_cifar10(None, "eval.fid.reference_images")
    name, split = OmegaConf.select(cfg, "data.name"), OmegaConf.select(cfg, "data.split")
    year = OmegaConf.select(cfg, "data.year")
    if (name, split) != (ref.dataset, ref.split):
        raise ConfigError(
            "eval.fid.reference",
            f"'{ref.name}' does not match data={name} (split {split}); pass e.g. "
            f"data={ref.dataset}, or eval.fid.reference={name}_{split}{ref.resolution}, or "
            "eval.fid.reference_images=/path/to/images.",
        )
    root = OmegaConf.select(cfg, "data.root")
    if not root:
        raise ConfigError(
            "data.root",
            "is not set; point it at your COCO folder "
            "(e.g. data.root=/data/coco) or set eval.fid.reference_images.",
        )
    return Path(root).expanduser() / f"{split}{year or ref.year or ''}"


def unpack_cifar10(folder: Path, fid) -> Path:
    """CIFAR-10 ships as pickled batches, not image files: unpack ``fid.ref.split`` once to
    ``<cache_dir>/cifar10_<split>_png/`` and read the reference from there (other folders are
    returned unchanged)."""
    from edm.models.cifar10 import export_pngs, is_cifar10_dir

    if fid.ref.dataset != "cifar10" or not is_cifar10_dir(folder):
        return folder
    out = fid.cache_dir / f"cifar10_{fid.ref.split}_png"
    log.info("Unpacking CIFAR-10 %s from %s to %s", fid.ref.split, folder, out)
    return export_pngs(folder, out, fid.ref.split)


def main(argv: list[str] | None = None) -> Path:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return Path()
    overwrite = "--overwrite" in args
    args = [a for a in args if a != "--overwrite"]
    from hydra.utils import instantiate

    cfg = compose(args)
    if "fid" not in cfg.eval:
        raise ConfigError("eval", "the chosen eval preset has no fid evaluator.")
    images_dir = reference_images_dir(cfg)
    fid = instantiate(cfg.eval.fid)
    images_dir = unpack_cifar10(images_dir, fid)
    path = fid.build_reference(images_dir, overwrite=overwrite)
    print(path)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    main()

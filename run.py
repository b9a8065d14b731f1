"""edm entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from edm.runner import run  # imported here so `--help`/`--cfg` stay fast

    return run(cfg)


if __name__ == "__main__":
    main()

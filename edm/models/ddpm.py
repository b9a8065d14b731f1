"""Unconditional DDPM models (family ``ddpm``) under the runner's text-to-image call contract.

OBS-Diff's Table 10 prunes ``google/ddpm-cifar10-32`` (Ho et al. 2020): a pixel-space
``UNet2DModel`` with no text input. Three small pieces let it run through the same runner,
generation, resume and evaluation code as every text-to-image model, with no special case there:

* :class:`~edm.models.ddpm_pipeline.DDPMUncondPipeline` takes the runner's ``pipe(prompt=[...], generator=[...], ...)`` and
  makes one image per prompt, ignoring the text: image ``i`` is determined by its seed alone;
* :class:`UnconditionalSamples` (``data=unconditional``) is "N images": N empty prompts, whose
  per-index seeds give every method the same initial noise for image ``i``;
* :class:`DDPMHubPipeline` (``model=ddpm_cifar10``) and :class:`TinyDDPMLoader`
  (``model=tiny_ddpm``) load it and offer ``train_data()`` -- the images Diff-Pruning needs.

``model.limits.guidance: none`` makes the pre-load checks reject a guidance scale or a negative
prompt, which an unconditional model cannot use. This module imports no diffusers (Hydra builds
its loaders and data set before anything heavy loads).
"""

from __future__ import annotations

import logging

import torch

from edm.data.images import PromptItem
from edm.errors import ConfigError
from edm.models.tiny import TinyPipeline
from edm.models.zoo import HubPipeline
from edm.validate import to_dtype

log = logging.getLogger(__name__)


class UnconditionalSamples:
    """``data=unconditional``: ``num_prompts`` images of an unconditional model.

    Every item has the empty prompt; its index fixes its seed (``seed * 1_000_003 + index``), so
    image ``i`` starts from the same noise under every method. The key keeps the name the other
    prompt sets use, so ``data.num_prompts=50000`` and ``debug=default`` work unchanged.
    """

    def __init__(self, num_prompts: int = 100, name: str = "unconditional"):
        self.num_prompts, self.name = num_prompts, name

    def check(self) -> None:
        n = self.num_prompts
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError("data.num_prompts", f"must be a positive integer (the number of "
                              f"images), got {n!r}.")

    def load(self) -> list[PromptItem]:
        self.check()
        return [PromptItem(i, "") for i in range(self.num_prompts)]


class DDPMHubPipeline(HubPipeline):
    """``model=ddpm_cifar10``: a diffusers DDPM repo (``model_index.json`` + ``unet/`` +
    ``scheduler/``) from the local HF cache or ``path``; pre-flight and errors as
    :class:`~edm.models.zoo.HubPipeline` (never downloads).

    Args:
        repo_id, path, revision, variant, scheduler: as for ``HubPipeline``.
        train_data_dir: the extracted ``cifar-10-batches-py`` folder: Diff-Pruning's training
            images (``train_data()``), checked before loading when the method needs them.
    """

    def __init__(self, repo_id: str, path: str | None = None, revision: str | None = None,
                 variant: str | None = None, scheduler: str | None = None,
                 train_data_dir: str | None = None):
        super().__init__(repo_id, path=path, variant=variant, revision=revision,
                         scheduler=scheduler)
        self.train_data_dir = train_data_dir

    def load(self, family: str, dtype, device):
        from diffusers import DDPMScheduler, UNet2DModel

        from edm.models.components import set_scheduler
        from edm.models.ddpm_pipeline import DDPMUncondPipeline

        if family != "ddpm":
            raise ConfigError("model.family", f"DDPMHubPipeline loads family 'ddpm', not "
                              f"{family!r}.", ["ddpm"])
        root = self.check()
        kw = {"local_files_only": True, **({"variant": self.variant} if self.variant else {})}
        log.info("Loading UNet2DModel from %s <model.loader.repo_id=%s>", root, self.repo_id)
        unet = UNet2DModel.from_pretrained(str(root), subfolder="unet", torch_dtype=to_dtype(dtype),
                                           **kw)
        scheduler = DDPMScheduler.from_pretrained(str(root), subfolder="scheduler",
                                                  local_files_only=True)
        pipe = DDPMUncondPipeline(unet=unet, scheduler=scheduler)
        set_scheduler(pipe, self.scheduler)  # from_config: the DDPM betas are kept
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.edm_family = family
        return pipe

    def check_train_data(self) -> None:
        from edm.models.cifar10 import check_cifar10

        check_cifar10(self.train_data_dir, "model.loader.train_data_dir")

    def train_data(self) -> tuple[torch.Tensor, None]:
        """CIFAR-10's 50 000 training images in [0, 1] (``[N, 3, 32, 32]``); no prompts."""
        from edm.models.cifar10 import read_cifar10

        images, _ = read_cifar10(self.train_data_dir, "train", "model.loader.train_data_dir")
        return torch.from_numpy(images).float() / 255.0, None


class TinyDDPMLoader(TinyPipeline):
    """``model=tiny_ddpm``: :func:`edm.models.tiny.tiny_ddpm` (random weights, 3x16x16), whose
    ``train_data()`` is scikit-learn's digits as RGB images, so Diff-Pruning and its fine-tuning
    run end to end offline in seconds."""

    def __init__(self, kind: str = "ddpm", seed: int = 0, scheduler: str | None = None,
                 num_train_images: int = 256):
        super().__init__(kind, seed=seed, scheduler=scheduler)
        self.num_train_images = int(num_train_images)

    def check_train_data(self) -> None:
        """Nothing to fetch (the digits ship with scikit-learn)."""

    def train_data(self) -> tuple[torch.Tensor, None]:
        from edm.digits.data import digit_images

        images, _ = digit_images("train")  # [N, 1, 16, 16] in [0, 1]
        return images[: self.num_train_images].float().repeat(1, 3, 1, 1), None

"""ImageReward evaluator: the official checkpoint scored by :mod:`edm.eval.image_reward_model`.

Files (resolved offline, see :mod:`edm.eval.weights`):

* ``ImageReward.pt`` and ``med_config.json`` of hub repo ``THUDM/ImageReward``;
* ``vocab.txt`` of ``bert-base-uncased`` (BLIP's tokenizer).

``evaluate`` returns ``image_reward`` (mean over images, the number OBS-Diff reports) and
``image_reward_per_image``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from edm.eval.base import ImageSet, read_image
from edm.eval.weights import cached_hf_file, require_file, require_hf_file

log = logging.getLogger(__name__)

IR_REPO = "THUDM/ImageReward"


class ImageReward:
    """Human-preference reward of each (prompt, image) pair.

    Args:
        checkpoint: path to ``ImageReward.pt``; ``None`` = the hub cache (``THUDM/ImageReward``).
        med_config: path to ``med_config.json``; ``None`` = from the hub cache.
        tokenizer: folder holding bert-base-uncased's ``vocab.txt``, or its hub repo id
            (default ``bert-base-uncased``; ``google-bert/bert-base-uncased`` is also tried).
        batch_size: images per forward pass (16 fits easily on one GPU at fp32).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        vit_heads: ViT attention heads; ``None`` = width // 64 (the released ViT-L has 16).
    """

    name = "image_reward"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | None = None,
        tokenizer: str = "bert-base-uncased",
        batch_size: int = 16,
        device: str = "auto",
        vit_heads: int | None = None,
    ):
        self.checkpoint, self.med_config, self.tokenizer = checkpoint, med_config, tokenizer
        self.batch_size, self.device, self.vit_heads = batch_size, device, vit_heads
        self._scorer = None

    # -- files -------------------------------------------------------------------------------
    def _files(self) -> tuple[Path, Path, Path]:
        if self.checkpoint:
            ckpt = require_file(
                self.checkpoint,
                "ImageReward checkpoint",
                f"hf download {IR_REPO} ImageReward.pt",
                "eval.image_reward.checkpoint",
            )
        else:
            ckpt = require_hf_file(
                IR_REPO,
                "ImageReward.pt",
                "ImageReward",
                "eval.image_reward.checkpoint",
                also=["med_config.json"],
            )
        if self.med_config:
            med = require_file(
                self.med_config,
                "ImageReward med_config",
                f"hf download {IR_REPO} med_config.json",
                "eval.image_reward.med_config",
            )
        else:
            med = require_hf_file(
                IR_REPO,
                "med_config.json",
                "ImageReward",
                "eval.image_reward.med_config",
                also=["ImageReward.pt"],
            )
        return ckpt, med, self._vocab()

    def _vocab(self) -> Path:
        local = Path(self.tokenizer).expanduser()
        if local.is_dir():
            return require_file(
                local / "vocab.txt",
                "ImageReward tokenizer",
                "hf download bert-base-uncased vocab.txt",
                "eval.image_reward.tokenizer",
            )
        repos = [self.tokenizer]
        if "/" not in self.tokenizer:
            repos.append(f"google-bert/{self.tokenizer}")
        for repo in repos:
            if (found := cached_hf_file(repo, "vocab.txt")) is not None:
                return found
        return require_hf_file(
            repos[0],
            "vocab.txt",
            "ImageReward tokenizer (BLIP uses BERT's)",
            "eval.image_reward.tokenizer (a folder with vocab.txt)",
        )

    def check(self) -> None:
        """Pre-flight: checkpoint, med_config and tokenizer vocabulary are all local."""
        self._files()

    # -- scoring -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def scorer(self) -> ImageRewardScorer:
        if self._scorer is None:
            ckpt, med, vocab = self._files()
            self._scorer = ImageRewardScorer.load(ckpt, med, vocab, self._device(), self.vit_heads)
        return self._scorer

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        scorer = self.scorer()
        scores: list[float] = []
        paths, prompts = images.paths, images.prompts
        for s in range(0, len(paths), self.batch_size):
            scores += scorer.score(
                prompts[s : s + self.batch_size], paths[s : s + self.batch_size]
            )
        mean = sum(scores) / max(len(scores), 1)
        log.info("ImageReward = %.4f over %d images", mean, len(scores))
        return {"image_reward": mean, "image_reward_per_image": scores}


class ImageRewardScorer:
    """Model + preprocessing + tokenizer; ``score(prompts, images)`` -> list of rewards."""

    def __init__(self, model, tokenizer, device: torch.device):
        from edm.eval.image_reward_model import image_transform

        self.model, self.tokenizer, self.device = model.to(device), tokenizer, device
        self.transform = image_transform(model.image_size)

    @classmethod
    def load(
        cls,
        checkpoint: Path,
        med_config: Path,
        vocab: Path,
        device: torch.device,
        vit_heads: int | None = None,
    ) -> ImageRewardScorer:
        from edm.eval.image_reward_model import ImageRewardModel, blip_tokenizer, load_med_config

        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = ImageRewardModel.from_state_dict(sd, load_med_config(med_config), vit_heads)
        log.info("Loaded ImageReward from %s", checkpoint)
        return cls(model, blip_tokenizer(vocab), device)

    @torch.no_grad()
    def score(self, prompts: list[str], images: list[str | Path | Image.Image]) -> list[float]:
        """Rewards of ``images[i]`` for ``prompts[i]`` (paths or PIL images)."""
        from edm.eval.image_reward_model import MAX_TEXT_LEN

        assert len(prompts) == len(images), "one prompt per image"
        pix = []
        for im in images:
            if isinstance(im, Image.Image):
                pix.append(self.transform(im))
            else:
                with read_image(im) as pil:  # DamagedImageError names a file that won't decode
                    pix.append(self.transform(pil))
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TEXT_LEN,
            return_tensors="pt",
        )
        out = self.model(
            torch.stack(pix).to(self.device),
            tok.input_ids.to(self.device),
            tok.attention_mask.to(self.device),
        )
        return out.float().cpu().tolist()

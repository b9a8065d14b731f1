"""Fidelity to the dense model: PSNR, SSIM and LPIPS of each image against the dense model's
image for the same prompt, seed and protocol (torchmetrics).

This is what caching papers report, and it tells "changed the picture" (a different but good
image: FID/CLIP unchanged, PSNR low) from "broke the picture" (LPIPS high *and* quality down).
The runner finds or makes the dense references (:mod:`edm.eval.dense_ref`) and sets
:attr:`PairedFidelity.reference_dir` before :meth:`evaluate` runs.

LPIPS needs two files: its linear heads ship inside torchmetrics, and the backbone is
torchvision's ImageNet network in torch's hub cache (``$TORCH_HOME/hub/checkpoints``).
:meth:`check` resolves the backbone offline and names the file and the command when it is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.base import ImageSet

METRICS = ("psnr", "ssim", "lpips")
LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def lpips_backbone_file(net: str) -> Path:
    """Where torchvision looks for the LPIPS backbone's ImageNet weights."""
    import torchvision

    weights = torchvision.models.get_model_weights(LPIPS_NETS[net]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class PairedFidelity:
    """Per-image PSNR / SSIM / LPIPS against the dense references.

    Args:
        metrics: any of ``psnr`` (dB, data range 1; ``inf`` for identical images), ``ssim``
            (Gaussian window 11, sigma 1.5: the standard setting) and ``lpips`` (lower = closer).
        lpips_net: LPIPS backbone, ``alex`` (the LPIPS authors' recommended default), ``vgg`` or
            ``squeeze``.
        root: folder of the shared dense reference sets (``${paths.cache_dir}/dense_refs``).
        make_reference: make missing references with the run's dense pipeline before its method
            is applied; ``false`` = they must exist (e.g. an eval-only job).
        batch_size: images per metric batch.
        device: where the metrics run (``cpu``; LPIPS on 512^2 images is cheap enough).
        lpips_min_size: smaller images are upsampled to this shorter side for LPIPS only.
    """

    name = "paired"
    needs_dense_reference = True

    def __init__(self, metrics=METRICS, lpips_net: str = "alex", root: str = "dense_refs",
                 make_reference: bool = True, batch_size: int = 16, device: str = "cpu",
                 lpips_min_size: int = 64):
        self.metrics = tuple(metrics)
        bad = sorted(set(self.metrics) - set(METRICS))
        if bad or not self.metrics:
            raise ConfigError("eval.paired.metrics", f"unknown or empty: {bad}.", METRICS)
        if lpips_net not in LPIPS_NETS:
            raise ConfigError("eval.paired.lpips_net", f"unknown backbone {lpips_net!r}.",
                              list(LPIPS_NETS))
        self.lpips_net, self.root = lpips_net, root
        self.make_reference = bool(make_reference)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.lpips_min_size = int(lpips_min_size)
        self.reference_dir: Path | None = None  # set by the runner (edm.eval.dense_ref)
        self.meta: dict = {}
        self._lpips = None

    def check(self) -> None:
        if "lpips" not in self.metrics:
            return
        path = lpips_backbone_file(self.lpips_net)
        if not path.is_file():
            arch = LPIPS_NETS[self.lpips_net]
            raise MissingWeightsError(
                f"LPIPS ({self.lpips_net}) needs torchvision's ImageNet {arch} weights at {path}. "
                f"Fetch on a machine with internet access:\n"
                f"    python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"\n"
                f"then copy {path.name} into {path.parent} here (or set TORCH_HOME to a folder "
                f"whose hub/checkpoints has it); or drop it: eval.paired.metrics=[psnr,ssim].")

    def _lpips_metric(self):
        if self._lpips is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._lpips = LearnedPerceptualImagePatchSimilarity(
                net_type=self.lpips_net, reduction="sum", normalize=True).to(self.device).eval()
        return self._lpips

    def _scores(self, x: torch.Tensor, ref: torch.Tensor) -> dict[str, list[float]]:
        """Per-image scores of float [B, 3, H, W] batches in [0, 1]."""
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        out: dict[str, list[float]] = {}
        if "psnr" in self.metrics:
            out["psnr"] = peak_signal_noise_ratio(x, ref, data_range=1.0, reduction="none",
                                                  dim=(1, 2, 3)).tolist()
        if "ssim" in self.metrics:
            out["ssim"] = structural_similarity_index_measure(
                x, ref, data_range=1.0, reduction="none").tolist()
        if "lpips" in self.metrics:
            metric = self._lpips_metric()
            x, ref = self._lpips_size(x), self._lpips_size(ref)
            with torch.no_grad():  # one image per call: reduction over a batch of one
                out["lpips"] = [float(metric(a[None], b[None])) for a, b in zip(x, ref)]
                metric.reset()
        return out

    def _lpips_size(self, x: torch.Tensor) -> torch.Tensor:
        """AlexNet's strided stem and three max-pools leave no spatial extent below ~32 px (the
        16x16 digits): smaller images are upsampled (bilinear) to ``lpips_min_size`` first."""
        h, w = x.shape[-2:]
        if min(h, w) >= self.lpips_min_size:
            return x
        f = self.lpips_min_size / min(h, w)
        size = (round(h * f), round(w * f))
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        if self.reference_dir is None:
            raise RuntimeError("PairedFidelity.reference_dir is unset (the runner sets it)")
        refs = ImageSet(self.reference_dir, images.items, size=images.size)
        missing = refs.missing()
        if missing:
            raise MissingWeightsError(f"{len(missing)} dense reference images missing or damaged "
                                      f"in {self.reference_dir} (first: {missing[:5]})")
        per: dict[str, list[float]] = {m: [] for m in self.metrics}
        # RGB for every model: the digits model's L images become 3 equal channels (LPIPS's
        # backbone is an RGB network; PSNR and SSIM are unchanged by the repetition)
        for (x, _), (r, _) in zip(images.iter_batches(self.batch_size, mode="RGB"),
                                  refs.iter_batches(self.batch_size, mode="RGB")):
            scores = self._scores(x.to(self.device).float() / 255, r.to(self.device).float() / 255)
            for k, v in scores.items():
                per[k] += v
        self.meta = {"reference_dir": str(self.reference_dir), "lpips_net": self.lpips_net}
        out: dict[str, float | list[float]] = {}
        for k, v in per.items():
            out[k] = _mean(v)
            out[f"{k}_per_image"] = v
        return out


def _mean(values: list[float]) -> float:
    """Arithmetic mean (PSNR: ``inf`` as soon as one image equals its reference); NaN if empty."""
    if not values:
        return math.nan
    return float(sum(values) / len(values))

"""FID with clean-fid's Inception network and resizer, against cached reference statistics.

Protocol (kept fixed so numbers are comparable across methods and runs):

* Features: clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``, pool3, 2048-d),
  resized the clean-fid way for ``mode`` (``clean``: PIL bicubic to 299² on float pixels;
  ``legacy_tensorflow``: the network's own TF-style resize).
* Reference: one ``.npz`` of (mu, sigma) per (dataset, split, resolution, mode), named
  ``<reference>_<mode>.npz`` (e.g. ``coco2014_val512_clean.npz``) under ``cache_dir``. Real images
  are centre-cropped to a square and resized (PIL bicubic) to ``resolution`` first, then go through
  the same feature path as generated images. Built once by ``python -m edm.eval.precompute``.
* Generated images stream from disk (``ImageSet``, e.g. the union of all shards); images whose size
  differs from ``resolution`` get the same crop/resize as the references.
* Distance: :func:`edm.eval.frechet.frechet_distance` (clean-fid's formula, tested equal to it)
  on float64 moments.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.base import ImageSet, read_image
from edm.eval.frechet import frechet_distance
from edm.eval.weights import require_file

log = logging.getLogger(__name__)

MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# A 4-digit suffix is a year (coco2014); any other digits belong to the name (cifar10_train32).
_REF_RE = re.compile(r"^(?P<dataset>[a-z]+(?:(?P<year>\d{4})|\d+)?)_(?P<split>[a-z]+)(?P<res>\d+)$")


@dataclass(frozen=True)
class Reference:
    """A reference set name ``<dataset>_<split><resolution>``, e.g. ``coco2014_val512``."""

    name: str
    dataset: str
    split: str
    resolution: int
    year: str | None

    @classmethod
    def parse(cls, name: str) -> Reference:
        m = _REF_RE.match(name)
        if m is None:
            raise ConfigError(
                "eval.fid.reference",
                f"'{name}' must look like <dataset>_<split><resolution>, e.g. coco2014_val512.",
            )
        return cls(name, m["dataset"], m["split"], int(m["res"]), m["year"])


class RunningMoments:
    """Streaming mean and unbiased covariance (Chan et al. pairwise merge, float64).

    Matches ``np.mean(x, 0)`` / ``np.cov(x, rowvar=False)`` of all rows seen, without keeping them.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of outer products of deviations

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(0)
        d = x - mb
        m2b = d.T @ d
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 += m2b  # in place: at 2048-d each temporary is 32 MB
        self.m2 += np.outer(delta * (self.n * nb / n), delta)
        self.n = n

    @property
    def cov(self) -> np.ndarray:
        assert self.n > 1 and self.m2 is not None, "need at least 2 samples for a covariance"
        return self.m2 / (self.n - 1)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop then PIL bicubic resize to ``size``² (no-op when already that size)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


class _FeatureInputs(torch.utils.data.Dataset):
    """Image files -> float [3, H, W] in [0, 255], resized the clean-fid way for the extractor."""

    def __init__(self, paths: Sequence[Path], resolution: int, resize: Callable | None):
        self.paths, self.resolution, self.resize = list(paths), resolution, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with read_image(self.paths[i]) as im:  # DamagedImageError names a file that won't decode
            img = center_crop_resize(im.convert("RGB"), self.resolution)
        arr = np.asarray(img)  # uint8 HWC, as if saved at `resolution`
        arr = self.resize(arr) if self.resize is not None else arr.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)


class FID:
    """Fréchet Inception Distance of generated images to a cached reference set.

    Args:
        reference: ``<dataset>_<split><resolution>``; names the stats file and fixes the
            resolution real images are brought to. ``coco2014_val512`` (OBS-Diff),
            ``coco2017_val1024`` (AT-EDM).
        mode: clean-fid mode, ``clean`` (default, recommended: antialiased resize) or
            ``legacy_tensorflow`` (TF-FID compatible numbers). Recorded in ``meta`` and in the
            stats file name.
        cache_dir: where reference statistics live (``${paths.cache_dir}/fid_refs``).
        inception_path: the TorchScript Inception file; fetch it from :data:`INCEPTION_URL`.
        reference_images: folder of real images for :meth:`build_reference`; ``None`` =
            derived by ``edm.eval.precompute`` from ``data.root`` (``<root>/<split><year>``).
        max_reference_images: use a seeded random subset of this many real images (``None`` = all,
            recommended: the whole split gives the least noisy reference). A subset gets its own
            stats file (``..._n<N>s<seed>.npz``).
        reference_seed: seed of that subset.
        batch_size: feature-extraction batch size.
        num_workers: DataLoader workers decoding/resizing images (0 in tests).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        feature_model: optional callable float [B, 3, S, S] in [0, 255] -> [B, D] replacing
            Inception (tests). Requires ``feature_name`` so its stats never mix with Inception's.
        feature_name: tag for ``feature_model`` in stats file names.
        feature_size: input size ``S`` for ``feature_model`` (Inception uses 299).
        how_to_build: the command that builds the missing statistics, shown by :meth:`check`
            (``None`` = the COCO ``edm.eval.precompute`` command; CIFAR-10 sets its own).
    """

    name = "fid"

    def __init__(
        self,
        reference: str = "coco2014_val512",
        mode: str = "clean",
        cache_dir: str = "~/.cache/edm/fid_refs",
        inception_path: str = "~/.cache/edm/weights/" + INCEPTION_FILE,
        reference_images: str | None = None,
        max_reference_images: int | None = None,
        reference_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        device: str = "auto",
        feature_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
        feature_name: str | None = None,
        feature_size: int = 299,
        how_to_build: str | None = None,
    ):
        if mode not in MODES:
            raise ConfigError("eval.fid.mode", f"unsupported clean-fid mode '{mode}'.", MODES)
        if feature_model is not None and not feature_name:
            raise ConfigError("eval.fid.feature_name", "required with an injected feature_model.")
        if max_reference_images is not None and max_reference_images < 2:
            raise ConfigError("eval.fid.max_reference_images", "must be >= 2 or null.")
        self.ref = Reference.parse(reference)
        self.mode = mode
        self.cache_dir = Path(cache_dir).expanduser()
        self.inception_path = Path(inception_path).expanduser()
        self.reference_images = reference_images
        self.max_reference_images = max_reference_images
        self.reference_seed = reference_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device = device
        self.feature_model, self.feature_name, self.feature_size = (
            feature_model,
            feature_name,
            feature_size,
        )
        self.how_to_build = how_to_build
        self._model: Callable | None = feature_model
        self.meta: dict[str, str] = {"mode": mode, "reference": reference}

    # -- files -------------------------------------------------------------------------------
    @property
    def stats_path(self) -> Path:
        tag = f"_{self.feature_name}" if self.feature_model is not None else ""
        if self.max_reference_images is not None:  # a subset is a different reference
            tag += f"_n{self.max_reference_images}s{self.reference_seed}"
        return self.cache_dir / f"{self.ref.name}_{self.mode}{tag}.npz"

    def _require_inception(self) -> Path:
        return require_file(
            self.inception_path,
            "FID Inception network",
            f"Fetch it once with:\n    mkdir -p {self.inception_path.parent} && "
            f"curl -L -o {self.inception_path} {INCEPTION_URL}",
            "eval.fid.inception_path",
        )

    def check(self) -> None:
        """Pre-flight: the Inception file (unless injected) and the reference statistics exist."""
        if self.feature_model is None:
            self._require_inception()
        if not self.stats_path.is_file() and self.how_to_build:
            raise MissingWeightsError(
                f"FID reference statistics {self.stats_path} do not exist. Build them once:\n"
                f"    {self.how_to_build}\n(or copy {self.stats_path.name} into {self.cache_dir})."
            )
        if not self.stats_path.is_file():
            raise MissingWeightsError(
                f"FID reference statistics {self.stats_path} do not exist. Build them once "
                f"from your {self.ref.dataset} {self.ref.split} images:\n"
                f"    python -m edm.eval.precompute data={self.ref.dataset} "
                f"data.root=/path/to/coco eval.fid.reference={self.ref.name} "
                f"eval.fid.mode={self.mode}\n"
                f"(or copy {self.stats_path.name} into {self.cache_dir})."
            )

    # -- features ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _extractor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._model is None:
            from cleanfid.inception_torchscript import InceptionV3W

            path = self._require_inception()
            if path.name != INCEPTION_FILE:  # InceptionV3W takes a folder and a fixed file name
                raise ConfigError(
                    "eval.fid.inception_path", f"file must be named {INCEPTION_FILE}."
                )
            net = InceptionV3W(
                str(path.parent), download=False, resize_inside=self.mode == "legacy_tensorflow"
            )
            self._model = net.to(self._device()).eval()
        elif isinstance(self._model, torch.nn.Module):
            self._model.to(self._device()).eval()  # an injected module follows `device` too
        return self._model

    def _resizer(self) -> Callable | None:
        from cleanfid.resize import build_resizer, make_resizer

        if self.feature_model is not None:
            s = self.feature_size
            return make_resizer("PIL", False, "bicubic", (s, s))
        return build_resizer(self.mode)  # identity for legacy_tensorflow (resized inside)

    @torch.no_grad()
    def moments(self, paths: Sequence[Path]) -> RunningMoments:
        """Feature mean/covariance of image files, streamed in batches."""
        model, dev = self._extractor(), self._device()
        ds = _FeatureInputs(paths, self.ref.resolution, self._resizer())
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, num_workers=self.num_workers
        )
        acc = RunningMoments()
        for batch in loader:
            feats = model(batch.to(dev))
            acc.update(feats.detach().float().cpu().numpy())
        return acc

    # -- reference -----------------------------------------------------------------------------
    def build_reference(
        self, images_dir: str | os.PathLike | None = None, overwrite: bool = False
    ) -> Path:
        """Compute and cache reference statistics from a folder of real images.

        Args:
            images_dir: folder (searched recursively); default ``reference_images``.
            overwrite: recompute even if the stats file exists (default: reuse it).
        """
        out = self.stats_path
        if out.is_file() and not overwrite:
            log.info("Reference stats <%s> exist; reusing (overwrite=true recomputes)", out)
            return out
        folder = Path(images_dir or self.reference_images or "").expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"reference image folder '{folder}' does not exist")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if len(files) < 2:
            raise FileNotFoundError(f"found {len(files)} images under {folder}; need >= 2")
        if self.max_reference_images is not None and self.max_reference_images < len(files):
            rng = np.random.default_rng(self.reference_seed)
            keep = np.sort(rng.choice(len(files), self.max_reference_images, replace=False))
            files = [files[i] for i in keep]
        log.info(
            "Computing FID reference <%s> from %d images in %s (mode=%s)",
            self.ref.name,
            len(files),
            folder,
            self.mode,
        )
        t0 = time.time()
        acc = self.moments(files)
        meta = {
            "reference": self.ref.name,
            "mode": self.mode,
            "resolution": self.ref.resolution,
            "num_images": acc.n,
            "images_dir": str(folder),
            "crop": "center",
            "features": self.feature_name or INCEPTION_FILE,
            "seconds": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=acc.mean, sigma=acc.cov, n=acc.n, meta=json.dumps(meta))
        os.replace(tmp, out)  # atomic: a killed job never leaves a half-written reference
        log.info("Wrote <%s> (%d images, %.0fs)", out, acc.n, meta["seconds"])
        return out

    def load_reference(self) -> tuple[np.ndarray, np.ndarray, int]:
        self.check()
        with np.load(self.stats_path) as z:
            return z["mu"], z["sigma"], int(z["n"])

    # -- metric --------------------------------------------------------------------------------
    def evaluate(self, images: ImageSet) -> dict[str, float | list[float]]:
        """FID of ``images`` to the reference: ``{"fid", "fid_images", "fid_ref_images"}``."""
        missing = images.missing()
        if missing:
            raise FileNotFoundError(
                f"FID: {len(missing)} of {len(images)} images missing or damaged in "
                f"{images.images_dir} (first: {missing[:5]}); finish all shards (or rerun "
                f"generation, which regenerates damaged ones) before evaluating."
            )
        if len(images) < 2:
            raise ValueError("FID needs at least 2 generated images")
        mu_r, sigma_r, n_ref = self.load_reference()
        acc = self.moments(images.paths)
        fid = frechet_distance(acc.mean, acc.cov, mu_r, sigma_r)
        self.meta.update(stats=str(self.stats_path), features=self.feature_name or INCEPTION_FILE)
        log.info(
            "FID <%s, mode=%s> = %.4f (%d generated vs %d reference images)",
            self.ref.name,
            self.mode,
            fid,
            acc.n,
            n_ref,
        )
        return {"fid": fid, "fid_images": float(acc.n), "fid_ref_images": float(n_ref)}

"""Model loaders: the ``model.loader`` node of ``conf/model/*.yaml``.

Every loader is built by Hydra before anything heavy happens and offers two calls:

* ``check()`` -- pre-flight, run before any generation work: raises
  :class:`~edm.errors.MissingWeightsError` (naming the repo id and how to fetch it) when the
  weights are not on this machine. Never downloads.
* ``load(family, dtype, device) -> pipe`` -- builds the pipeline, moves it to ``device`` and
  sets ``pipe.edm_family`` (what ``edm.families.adapter`` reads).

Loaders: :class:`HubPipeline` (real weights from the local Hugging Face cache or a local folder),
:class:`edm.models.tiny.TinyPipeline` (tiny random weights) and :class:`FullSizePipeline`
(architecture-faithful random weights, for FLOPs and latency).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from edm.errors import ConfigError, MissingWeightsError
from edm.families import FAMILIES
from edm.models.archs import ArchSpec, arch_spec, build_denoiser
from edm.models.components import scheduler_class, set_scheduler
from edm.validate import DTYPES, to_dtype  # noqa: F401 - DTYPES re-exported by edm.models

log = logging.getLogger(__name__)

# diffusers pipeline class per family (SD2.1 and SD1.5 share one).
PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}

# model_index.json entries that are not components (or hold no weights we need).
_NOT_WEIGHTS = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor")


def _check_family(family: str, allowed=FAMILIES) -> None:
    if family not in allowed:
        raise ConfigError("model.family", f"unknown family {family!r}.", allowed)


class HubPipeline:
    """A real diffusers pipeline from the local Hugging Face cache or a local folder.

    Args:
        repo_id: hub id, e.g. ``stabilityai/stable-diffusion-xl-base-1.0``.
        path: a local folder holding the pipeline (``model_index.json`` + component folders);
            overrides ``repo_id`` when set (``model.loader.path=/local/folder``).
        variant: weight file variant to prefer (``fp16`` for repos that ship
            ``*.fp16.safetensors``; ``None`` otherwise).
        revision: hub revision (branch, tag or commit) of the cached snapshot; default ``main``.
        scheduler: optional diffusers scheduler class name replacing the model's default
            (built ``from_config`` of the default, so betas and spacing are kept).
        drop_t5: SD3 only: load without T5 (``text_encoder_3=None``); the pipeline then feeds
            ``max_sequence_length`` (256) zero tokens in its place, so the denoiser cost is
            unchanged. Saves ~9 GB (fp16) and changes image quality, so name the model
            accordingly (``sd35m-noT5``).
        safety_checker: SD1.x/2.x only: keep the NSFW checker (it blacks out flagged images,
            which corrupts FID); off by default.
        gated: the repo needs its licence accepted on the hub (SD3 / SD3.5); only changes the
            error message.
    """

    def __init__(
        self,
        repo_id: str,
        path: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        scheduler: str | None = None,
        drop_t5: bool = False,
        safety_checker: bool = False,
        gated: bool = False,
    ):
        self.repo_id = repo_id
        self.path = path
        self.variant = variant
        self.revision = revision
        self.scheduler = scheduler
        self.drop_t5 = bool(drop_t5)
        self.safety_checker = bool(safety_checker)
        self.gated = bool(gated)
        scheduler_class(scheduler)  # fail at instantiation, before any loading

    # -- pre-flight ---------------------------------------------------------------------------
    def _skipped(self) -> set[str]:
        skipped = set()
        if self.drop_t5:
            skipped |= {"text_encoder_3", "tokenizer_3"}
        if not self.safety_checker:
            skipped |= {"safety_checker", "feature_extractor"}
        return skipped

    def _how_to_fetch(self, reason: str) -> str:
        excl = ' --exclude "text_encoder_3/*" "tokenizer_3/*"' if self.drop_t5 else ""
        lines = [
            f"Weights of {self.repo_id!r} are not available offline: {reason}",
            "edm never downloads at run time. Pre-fetch them once on a machine with network:",
            f"    hf download {self.repo_id}{excl}",
            f"    (older huggingface_hub: huggingface-cli download {self.repo_id}{excl})",
        ]
        if self.variant:
            lines.append(
                f'    (only the {self.variant} weights: add --include "*.json" "*.txt" '
                f'"*.model" "*.{self.variant}*")'
            )
        lines += [
            (
                "into the cache this job will read (HF_HOME, default ~/.cache/huggingface; set "
                "HF_HOME to a shared path on clusters), or point the config at a local copy:"
            ),
            "    python run.py model=... model.loader.path=/local/folder",
        ]
        if self.gated:
            lines.append(
                f"{self.repo_id} is a gated model: accept its licence on "
                f"https://huggingface.co/{self.repo_id} and log in (hf auth login) before "
                "downloading."
            )
        return "\n".join(lines)

    def _root(self) -> Path:
        if self.path:
            root = Path(self.path).expanduser()
            if not root.is_dir():
                raise MissingWeightsError(
                    self._how_to_fetch(f"model.loader.path={root} does not exist.")
                )
            return root
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(
                snapshot_download(self.repo_id, revision=self.revision, local_files_only=True)
            )
        except (LocalEntryNotFoundError, OSError, ValueError):
            where = (
                f"no snapshot (revision {self.revision or 'main'}) in {constants.HF_HUB_CACHE}."
            )
            raise MissingWeightsError(self._how_to_fetch(where)) from None

    def check(self) -> Path:
        """Raise ``MissingWeightsError`` unless all needed components are on disk; return root.

        Reads ``model_index.json`` and checks that each component folder the pipeline will load
        exists, with a config and weight files (every shard of a sharded checkpoint). Files only
        count if they resolve (the cache's symlinks point into ``blobs/``; an interrupted download
        leaves no link).
        """
        root = self._root()
        index = root / "model_index.json"
        if not index.is_file():
            raise MissingWeightsError(self._how_to_fetch(f"{index} is missing."))
        missing = []
        for name, spec in json.loads(index.read_text()).items():
            if name.startswith("_") or name in self._skipped() or not isinstance(spec, list):
                continue
            if spec[0] is None or spec[1] is None:  # optional component not shipped
                continue
            folder = root / name
            files = [f for f in folder.glob("*") if f.exists()] if folder.is_dir() else []
            if not files:
                missing.append(f"{name}/")
                continue
            if any(k in spec[1] for k in _NOT_WEIGHTS):
                continue
            missing += [f"{name}/{m}" for m in _missing_weight_files(folder, self.variant)]
        if missing:
            raise MissingWeightsError(
                self._how_to_fetch(f"missing or incomplete in {root}: {', '.join(missing)}.")
            )
        return root

    # -- load ---------------------------------------------------------------------------------
    def load(self, family: str, dtype: str | torch.dtype, device: str | torch.device):
        """Load with ``from_pretrained(local_files_only=True)``; sets ``pipe.edm_family``."""
        import diffusers

        _check_family(family, tuple(PIPELINE_CLASSES))
        root = self.check()
        cls = getattr(diffusers, PIPELINE_CLASSES[family])
        kwargs: dict = {"torch_dtype": to_dtype(dtype), "local_files_only": True}
        if self.variant:
            kwargs["variant"] = self.variant
        if family == "sd3" and self.drop_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        if family in ("sd15", "sd21") and not self.safety_checker:
            kwargs.update(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        log.info("Loading %s from %s <model.loader.repo_id=%s>", cls.__name__, root, self.repo_id)
        pipe = cls.from_pretrained(str(root), **kwargs)
        set_scheduler(pipe, self.scheduler)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)  # the runner shows its own progress
        pipe.edm_family = family
        return pipe


def _missing_weight_files(folder: Path, variant: str | None = None) -> list[str]:
    """What a model component folder lacks: its config, or (any shard of) its weights.

    With a ``variant`` (``fp16``), the variant's files are checked when the folder has any
    (``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
    ``model.safetensors.index.fp16.json``), else the plain ones, as diffusers falls back to them.
    """
    missing = [] if (folder / "config.json").exists() else ["config.json"]
    files = [f for f in folder.iterdir() if f.exists()]
    tags = (f".{variant}.", f".{variant}-") if variant else ()
    is_variant = {f: any(t in f.name for t in tags) for f in files}
    use_variant = any(is_variant.values())
    files = [f for f in files if is_variant[f] == use_variant]
    for idx in (f for f in files if f.name.endswith(".json") and ".index" in f.name):
        shards = set(json.loads(idx.read_text()).get("weight_map", {}).values())
        missing += sorted(s for s in shards if not (folder / s).exists())
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        missing.append("*.safetensors")
    return missing


class FullSizePipeline:
    """Architecture-faithful pipeline with random weights (no download), for FLOPs and latency.

    The denoiser is the real architecture at full size (``edm.models.archs``); the text encoders
    are 1-layer stand-ins with the *real hidden sizes* and the VAE a small stand-in with the real
    latent channels and 8x downsampling, because only the denoiser is measured. SD3 pipelines
    run without T5 (the pipeline feeds 256 zero tokens in its place: same denoiser cost).

    Args:
        arch: ``sd15``, ``sd21``, ``sdxl``, ``sd3_medium``, ``sd35_medium``, ``sd35_large``,
            ``flux_dev``, ``flux_schnell``.
        device: ``meta`` (no memory: parameter counts, and FLOPs of the denoiser with
            ``edm.eval.flops.meta_denoiser_flops`` / ``meta_step_flops``; a meta pipeline
            cannot be *called*, schedulers need real numbers) or ``None`` to use the run's
            device (random weights; SDXL needs ~5 GB in bf16).
        seed: weight seed.
    """

    def __init__(self, arch: str, device: str | None = None, seed: int = 0):
        self.spec = arch_spec(arch)
        if device not in (None, "meta", "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ConfigError(
                "model.loader.device", f"unknown device {device!r}.", ["meta", "cpu", "cuda", None]
            )
        self.device = device
        self.seed = seed

    def check(self) -> None:
        """Nothing to fetch (random weights)."""

    def load(self, family: str, dtype: str | torch.dtype, device: str | torch.device):
        _check_family(family, (self.spec.family,))
        device = self.device or device
        pipe = full_pipeline(self.spec, device=device, dtype=to_dtype(dtype), seed=self.seed)
        pipe.set_progress_bar_config(disable=True)
        pipe.edm_family = family
        return pipe


def full_pipeline(
    arch: str | ArchSpec,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A diffusers pipeline around the full-size denoiser of ``arch`` (random weights).

    Only the denoiser is real-sized. Text encoders are 1-layer CLIP stand-ins with the real
    hidden sizes (so the denoiser gets real context shapes: 77 x 768 for SD1.5, 77 x 2048 plus a
    1280 pooled vector for SDXL...), the VAE is a small stand-in with the real latent channels
    and 8x downsampling, SD3 runs without T5 (256 zero tokens in its place) and FLUX.1 with a
    1-layer T5 stand-in of T5-XXL's width (the transformer needs real T5 states). Use it for
    latency and FLOPs of the denoiser, never for image quality.

    Args:
        arch: architecture name or spec (see ``edm.models.archs.ARCHS``).
        device: ``meta`` (no memory; denoiser FLOPs via ``edm.eval.flops``) or a real device.
        dtype: dtype of every component.
        seed: weight seed.
    """
    import diffusers

    from edm.models.components import (
        clip_text_encoder,
        default_scheduler,
        t5_tokenizer,
        tiny_vae,
        tokenizer,
    )

    spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
    denoiser = build_denoiser(spec, device=device, dtype=dtype, seed=seed)
    dims = spec.text_dims

    on_meta = torch.device(device).type == "meta"

    def te(i: int, projection: bool):
        # On meta, build the stand-ins there too: a 49408 x 1280 embedding is not free on CPU.
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return clip_text_encoder(
                dims[i],
                projection_dim=dims[i] if projection else None,
                num_layers=1,
                intermediate_size=64,
                seed=seed + 10 + i,
            )

    common = {"scheduler": default_scheduler(spec.family), "tokenizer": tokenizer()}
    if spec.family in ("sd15", "sd21"):
        pipe = diffusers.StableDiffusionPipeline(
            unet=denoiser,
            vae=tiny_vae(4, levels=4, seed=seed + 1),
            text_encoder=te(0, False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **common,
        )
    elif spec.family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            unet=denoiser,
            vae=tiny_vae(4, levels=4, seed=seed + 1),
            text_encoder=te(0, False),
            text_encoder_2=te(1, True),
            tokenizer_2=tokenizer("!"),
            **common,
        )
    elif spec.family == "flux":
        pipe = diffusers.FluxPipeline(
            transformer=denoiser,
            vae=tiny_vae(16, levels=4, sd3=True, seed=seed + 1),  # 16 channels, 8x, shift+scale
            text_encoder=te(0, False),  # CLIP-L: only its 768-d pooled output is used
            tokenizer=common["tokenizer"],
            text_encoder_2=_t5_stand_in(dims[1], on_meta, seed + 11),
            tokenizer_2=t5_tokenizer(),
            scheduler=common["scheduler"],
        )
    else:
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=denoiser,
            vae=tiny_vae(16, levels=4, sd3=True, seed=seed + 1),
            text_encoder=te(0, True),
            text_encoder_2=te(1, True),
            tokenizer_2=tokenizer("!"),
            text_encoder_3=None,
            tokenizer_3=None,
            **common,
        )
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            nn.Module.to(module, device=device, dtype=dtype)
    pipe.edm_family = spec.family
    return pipe


def _t5_stand_in(d_model: int, on_meta: bool, seed: int):
    """A 1-layer T5 encoder with T5-XXL's width (4096) on the offline character tokenizer: the
    FLUX transformer sees real context shapes (``max_sequence_length`` x 4096); its cost is
    not measured, so depth, heads and the MLP are minimal."""
    from transformers import T5Config, T5EncoderModel

    from edm.models.components import t5_tokenizer

    tok = t5_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=64, num_layers=1,
                   num_heads=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    device = torch.device("meta") if on_meta else contextlib.nullcontext()
    with device, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(cfg).eval()

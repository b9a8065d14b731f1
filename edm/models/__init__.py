"""Model zoo: loaders for real hub pipelines, tiny random pipelines and full-size architectures.

* ``edm.models.zoo``: ``HubPipeline`` (local HF cache / folder, never downloads),
  ``FullSizePipeline`` / ``full_pipeline`` (real denoiser sizes, random weights), dtypes.
* ``edm.models.tiny``: ``tiny_sd15`` / ``tiny_sdxl`` / ``tiny_sd3`` builders and ``TinyPipeline``.
* ``edm.models.archs``: real configs (``ARCHS``), ``build_denoiser`` (meta or random weights),
  ``sample_inputs`` (one denoiser call's arguments).
* ``edm.models.tokenizers``: the real CLIP tokenizer, offline.

A loader (the ``model.loader`` node) has ``check()`` (raise ``MissingWeightsError`` before any
work) and ``load(family, dtype, device) -> pipe`` (sets ``pipe.edm_family``).
"""

from edm.models.archs import ARCHS, build_denoiser, sample_inputs
from edm.models.tiny import TinyPipeline, tiny_sd3, tiny_sd15, tiny_sdxl
from edm.models.tokenizers import clip_tokenizer
from edm.models.zoo import DTYPES, FullSizePipeline, HubPipeline, full_pipeline, to_dtype

__all__ = [
    "ARCHS",
    "DTYPES",
    "FullSizePipeline",
    "HubPipeline",
    "TinyPipeline",
    "build_denoiser",
    "clip_tokenizer",
    "full_pipeline",
    "sample_inputs",
    "tiny_sd3",
    "tiny_sd15",
    "tiny_sdxl",
    "to_dtype",
]

"""The embedded default model: a tiny Stable-Diffusion-shaped text-to-digit model.

``DigitsLoader`` is the Hydra ``model.loader`` target (cheap to import); the pipeline and the
training scripts import diffusers lazily. See ``edm.digits.train`` to re-train the checkpoint
shipped in ``edm/digits/weights``.
"""

from edm.digits.loader import DigitsLoader

__all__ = ["DigitsLoader", "DigitsPipeline"]


def __getattr__(name):
    if name == "DigitsPipeline":  # keep `import edm.digits` free of diffusers
        from edm.digits.pipeline import DigitsPipeline

        return DigitsPipeline
    raise AttributeError(name)

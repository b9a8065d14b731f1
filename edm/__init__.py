"""edm: training-free efficiency methods for text-to-image diffusion models.

Entry points: ``python run.py`` (Hydra) or :func:`edm.runner.run` with a composed config.
"""

__version__ = "0.1.0"

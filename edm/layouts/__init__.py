"""A second embedded model (issue 14): one to four digits at named positions on a 32x32 canvas.

``LayoutsLoader`` is the Hydra ``model.loader`` target of ``model=layouts``. The checkpoint and
the evaluator's cell classifier are shipped in ``edm/layouts/weights``; re-create the checkpoint
with ``python -m edm.layouts.train --out edm/layouts/weights`` (byte-identical weights; time on one
CPU thread in ``experiments/results/layouts_premeasure.md``). The model shipped before it, whose
self-attention is unused, is kept as ``experiments/checkpoints/layouts_flat``.
"""

from edm.layouts.loader import LayoutsLoader

__all__ = ["LayoutsLoader"]

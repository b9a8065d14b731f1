"""A second embedded model (issue 14): one to four digits at named positions on a 32x32 canvas.

``LayoutsLoader`` is the Hydra ``model.loader`` target of ``model=layouts``. The checkpoint and
the evaluator's cell classifier are shipped in ``edm/layouts/weights``; re-create the checkpoint
with ``python -m edm.layouts.train --out edm/layouts/weights`` (under an hour on one CPU thread,
byte-identical weights).
"""

from edm.layouts.loader import LayoutsLoader

__all__ = ["LayoutsLoader"]

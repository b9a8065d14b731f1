"""A second embedded model (issue 14): one to four digits at named positions on a 32x32 canvas.

``LayoutsLoader`` is the Hydra ``model.loader`` target of ``model=layouts``. The checkpoint is
not shipped yet: create it with ``python -m edm.layouts.train --out edm/layouts/weights``
(about an hour on one CPU thread). The evaluator's cell classifier is shipped.
"""

from edm.layouts.loader import LayoutsLoader

__all__ = ["LayoutsLoader"]

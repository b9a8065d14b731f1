"""Weight pruning: layer-wise pruners sharing calibration, module packages and timestep weighting.

Kernels (pure tensors): ``masks``, ``obs``, ``hessian``. Wiring: ``calibrate`` (hooks on a running
pipeline), ``base_weight`` (the shared method base). Methods: ``Magnitude``, ``Wanda``,
``SparseGPT``, ``OBSDiff``, ``DSnoT``.
"""

from edm.methods.weight.base_weight import PruningMethod
from edm.methods.weight.dsnot import DSnoT
from edm.methods.weight.magnitude import Magnitude
from edm.methods.weight.obs_diff import OBSDiff
from edm.methods.weight.sparsegpt import SparseGPT
from edm.methods.weight.wanda import Wanda

__all__ = ["DSnoT", "Magnitude", "OBSDiff", "PruningMethod", "SparseGPT", "Wanda"]

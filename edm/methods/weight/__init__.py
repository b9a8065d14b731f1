"""Weight pruning: methods that calibrate once and change the denoiser's weights in place.

Kernels (pure tensors): ``masks``, ``obs`` (unstructured / N:M OBS), ``structured`` (column-group
OBS), ``hessian``. Wiring: ``calibrate`` (hooks on a running pipeline), ``slicing`` (heads / FFN
neurons as targets, physical slicing), ``io`` (save / reload sliced models).

Bases: ``base_weight.PruningMethod`` (shared arguments, calibration, the one package loop,
``build_report``), with ``base_layerwise.LayerwisePruning`` (a subclass writes ``prune_layer``)
and ``base_structured.StructuredPruning`` (a subclass writes ``choose``).

Methods: ``Magnitude``, ``Wanda``, ``SparseGPT``, ``OBSDiff``, ``DSnoT`` (layer-wise);
``L1Norm``, ``OBSDiffStructured`` (structured); ``DiffPruning`` (channels pruned by
torch-pruning, then fine-tuned; its own pipeline, the shared report).
"""

from edm.methods.weight.base_layerwise import LayerwisePruning
from edm.methods.weight.base_structured import StructuredPruning
from edm.methods.weight.base_weight import PruningMethod
from edm.methods.weight.diff_pruning import DiffPruning
from edm.methods.weight.dsnot import DSnoT
from edm.methods.weight.l1 import L1Norm
from edm.methods.weight.magnitude import Magnitude
from edm.methods.weight.obs_diff import OBSDiff
from edm.methods.weight.obs_diff_structured import OBSDiffStructured
from edm.methods.weight.sparsegpt import SparseGPT
from edm.methods.weight.wanda import Wanda

__all__ = [
    "DSnoT", "DiffPruning", "L1Norm", "LayerwisePruning", "Magnitude", "OBSDiff", "OBSDiffStructured",
    "PruningMethod", "SparseGPT", "StructuredPruning", "Wanda",
]

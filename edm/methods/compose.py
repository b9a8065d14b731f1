"""Composition of methods from the CLI: a weight method, then a token method.

Hydra's list selection (``method=[obs_diff,at_edm]``) merges both files into the one ``method``
node, so their keys (``_target_``, ``name``, ``tag``...) overwrite each other. Instead, the method
applied second lives in its own node, ``then``, filled from the ``then`` config group whose files
only include a method config there (``conf/then/at_edm.yaml``: ``defaults: [/method/at_edm@then]``,
plus a run name that shows both tags)::

    python run.py method=obs_diff then=at_edm sparsity=0.5        # config.yaml lists `then: null`
    python run.py method=obs_diff +then=at_edm sparsity=0.5       # ... or without that entry
    python run.py method=wanda then=tome then.ratio=0.4 then.max_downsample=2
    python run.py model=tiny_flux method=obs_diff then=at_edm     # FLUX.1: both support it

Every override of the second method goes to ``then.*``; ``${sparsity}`` still reaches the first.
``cfg.then`` may also be a list of method nodes (applied in order), e.g. from an experiment file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from edm.errors import ConfigError
from edm.methods.base import Method, Sequential

log = logging.getLogger(__name__)


def _nodes(then) -> list:
    if then is None:
        return []
    if isinstance(then, (Mapping, DictConfig)):
        return [then]
    if isinstance(then, (Sequence, ListConfig)) and not isinstance(then, str):
        return list(then)
    raise ConfigError(
        "then", f"expected a method config node or a list of them, got {type(then).__name__}."
    )


def _build(node, key: str) -> Method:
    if not isinstance(node, (Mapping, DictConfig)) or "_target_" not in node:
        raise ConfigError(
            key, "is not a method config (no `_target_`); select one from conf/then/."
        )
    method = instantiate(node)
    if not isinstance(method, Method):
        raise ConfigError(key, f"`{node['_target_']}` did not build an edm Method.")
    return method


def build_method(cfg) -> Method:
    """The method a run applies: ``cfg.method``, followed by ``cfg.then`` when present.

    Args:
        cfg: the full run config (needs ``method``; ``then`` is optional: absent or null means
            no composition, a method node or a list of method nodes means apply them after).

    Returns:
        the single method, or an :class:`edm.methods.base.Sequential` named ``a+b`` that applies
        them in order, reports ``kind="compose"`` and removes them in reverse order.
    """
    first = _build(cfg["method"], "method")
    then = cfg.get("then") if hasattr(cfg, "get") else None
    nodes = _nodes(then)
    rest = [_build(n, "then" if len(nodes) == 1 else f"then.{i}") for i, n in enumerate(nodes)]
    if not rest:
        return first
    methods = [first, *rest]
    for prev, nxt in itertools.pairwise(methods):
        if prev.kind == "runtime" and nxt.kind == "weights":
            # A weight method after a token method would calibrate on merged/pruned tokens:
            # almost surely a swapped order, so refuse instead of producing a subtle result.
            raise ConfigError(
                "then",
                f"weight method {nxt.name!r} after runtime method {prev.name!r}; put the weight "
                "method in `method=` and the token method in `then=`.",
            )
    caches = [m.name for m in methods if m.is_cache]
    if len(caches) > 1:
        raise ConfigError("then", f"two feature caches ({', '.join(caches)}): each would replay "
                          "the other's stale features; compose a cache with weight or token "
                          "methods, not with another cache.")
    name = "+".join(m.name for m in methods)
    log.info("Composing methods <method=%s>", name)
    return Sequential(methods, name=name)

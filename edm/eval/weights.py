"""Offline weight resolution for learned metrics, and the evaluator pre-flight.

edm never downloads at run time. Every learned metric resolves its files here, from either an
explicit path in the config or the local Hugging Face cache, and raises
:class:`edm.errors.MissingWeightsError` naming the exact file and how to fetch it. The runner calls
:func:`preflight` before loading the pipeline, so a missing file fails in seconds, not after hours
of sampling.

Cache layout (all overridable per evaluator):

* Hugging Face hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``): open_clip
  weights, ``THUDM/ImageReward`` (``ImageReward.pt``, ``med_config.json``),
  ``bert-base-uncased`` (``vocab.txt``); fill it with ``hf download <repo> <files>`` on a
  machine with internet access.
* ``${paths.cache_dir}/weights/inception-2015-12-05.pt``: the FID Inception network (not on
  the hub).
* ``${paths.cache_dir}/fid_refs/``: FID reference statistics (``python -m edm.eval.precompute``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edm.errors import MissingWeightsError

log = logging.getLogger(__name__)


def hf_hub_cache() -> Path:
    """The hub cache directory huggingface_hub reads (honours ``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hf_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """Path of ``repo_id/filename`` in the local hub cache, or ``None``; never touches the network.

    Args:
        repo_id: hub repository, e.g. ``"THUDM/ImageReward"``.
        filename: file inside the repository, e.g. ``"ImageReward.pt"``.
        revision: branch, tag or commit; ``None`` = ``main`` (what ``hf download`` fetched).
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def fetch_hint_hf(repo_id: str, filenames: Sequence[str]) -> str:
    """The commands that put ``filenames`` of ``repo_id`` into the cache this process reads."""
    cache = hf_hub_cache()
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    return (
        f"Fetch on a machine with internet access:\n"
        f"    hf download {repo_id} {' '.join(filenames)}\n"
        f"then copy its cache folder ({folder.name}) into {cache} on this machine "
        f"(or point HF_HUB_CACHE at a cache that has it)."
    )


def require_hf_file(
    repo_id: str,
    filename: str,
    what: str,
    override_key: str | None = None,
    also: Sequence[str] = (),
) -> Path:
    """Resolve ``repo_id/filename`` from the local hub cache or raise ``MissingWeightsError``.

    Args:
        repo_id: hub repository.
        filename: file inside it.
        what: human name of the metric/weights, first words of the error.
        override_key: config key that takes an explicit local path instead (named in the error).
        also: other files of the same repo the metric needs (listed in the fetch command).
    """
    path = cached_hf_file(repo_id, filename)
    if path is not None:
        return path
    msg = (
        f"{what}: '{filename}' of hub repo '{repo_id}' is not in the local Hugging Face cache "
        f"({hf_hub_cache()}); edm never downloads at run time.\n"
        + fetch_hint_hf(repo_id, [filename, *also])
    )
    if override_key:
        msg += f"\nOr set {override_key}=/path/to/{filename}."
    raise MissingWeightsError(msg)


def require_file(path: str | os.PathLike, what: str, fetch: str, override_key: str) -> Path:
    """Return ``path`` if it is a file, else raise ``MissingWeightsError`` saying how to get it.

    Args:
        path: expected local file.
        what: human name of the weights/statistics.
        fetch: instructions (URL or command) that produce the file.
        override_key: config key that points at another location.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    raise MissingWeightsError(
        f"{what}: {p} does not exist; edm never downloads at run time.\n{fetch}\n"
        f"(or set {override_key}=/other/path)."
    )


def preflight(
    evaluators: Mapping[str, Any] | Sequence[Any], skip_unavailable: bool
) -> tuple[Mapping[str, Any] | list[Any], list[str]]:
    """Run every evaluator's ``check()`` before generation.

    Args:
        evaluators: ``{name: evaluator}`` (as instantiated from ``cfg.eval``) or a list of
            evaluators with a ``name`` attribute.
        skip_unavailable: ``eval.skip_unavailable``. ``False`` (default): the first
            ``MissingWeightsError`` propagates, so the run stops before sampling. ``True``: such
            evaluators are dropped and their names returned, so the run records what it skipped.
            Other exceptions always propagate (they are bugs or config errors, not missing files).

    Returns:
        ``(ok, skipped)``: the evaluators that passed (same container type as given) and the
        names of those skipped.
    """
    items: Iterable[tuple[str, Any]]
    if isinstance(evaluators, Mapping):
        items = evaluators.items()
    else:
        items = ((getattr(e, "name", type(e).__name__), e) for e in evaluators)
    ok: list[tuple[str, Any]] = []
    skipped: list[str] = []
    for name, ev in items:
        try:
            ev.check()
        except MissingWeightsError as err:
            if not skip_unavailable:
                raise
            log.warning("Skipping evaluator <eval.%s> (eval.skip_unavailable=true): %s", name, err)
            skipped.append(name)
            continue
        ok.append((name, ev))
    if isinstance(evaluators, Mapping):
        return dict(ok), skipped
    return [ev for _, ev in ok], skipped

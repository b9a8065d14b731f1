"""Prompt items and the generated images on disk: what generation writes and evaluation reads.

It lives in ``edm.data`` because both sides use it: ``edm.generate`` and the prompt sets import
it, evaluators (``edm.eval``) read through it, and neither depends on the other.

Whether an image file is usable is decided in one place, :func:`image_problem` (generation's
resume check and :meth:`ImageSet.damaged` both call it); evaluators read files through
:func:`read_image`, which raises :class:`~edm.errors.DamagedImageError` naming the file.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edm.errors import DamagedImageError


@dataclass(frozen=True)
class PromptItem:
    """One generation request. ``seed`` makes the same prompt get the same noise under every method."""

    index: int
    prompt: str
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> str:
        return json.dumps(
            {"index": self.index, "prompt": self.prompt, "seed": self.seed, "meta": self.meta}
        )


def image_path(images_dir: Path, index: int) -> Path:
    return Path(images_dir) / f"{index:06d}.png"


# What PIL raises on a damaged file (truncated, zero bytes, bad CRC, broken zlib stream, bad header).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def read_image(path: Path) -> Image.Image:
    """The fully decoded image at ``path``; :class:`DamagedImageError` naming it if it is not.

    ``verify()`` first (PNG chunk CRCs up to ``IEND``, ~0.2 ms at 512x512): it catches a file cut
    right before ``IEND``, which ``load()`` accepts, and truncation even where a library has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``. Then ``load()`` decodes every pixel (~4 ms).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again
            im.load()  # closing the file afterwards keeps the decoded pixels
            return im
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as e:
        try:
            n = os.path.getsize(path)
        except OSError:
            n = None
        what = "zero-byte file" if n == 0 else f"{type(e).__name__}: {e}; {n} bytes"
        raise DamagedImageError(path, f"does not decode ({what})") from e


def _spec_problem(got_size: tuple[int, int], got_mode: str, size: tuple[int, int] | None,
                  mode: str | None) -> str | None:
    if size is not None and tuple(size) != tuple(got_size):
        return f"size {got_size[0]}x{got_size[1]}, expected {size[0]}x{size[1]}"
    if mode is not None and got_mode != mode:
        return f"mode {got_mode}, expected {mode}"
    return None


MISSING = "missing"  # the reason given for a file that does not exist

Probe = tuple[str | None, tuple[int, int], str]  # (problem or None, (width, height), mode)


@functools.lru_cache(maxsize=1 << 17)
def _decode_probe(path: str, ino: int, size: int, mtime_ns: int) -> Probe:
    """Cached on (path, inode, size, mtime): checking an unchanged file twice in a process (the
    resume check, then the runner's pre-evaluation check) decodes it once, and a rewrite (atomic
    rename: new inode) is decoded again."""
    try:
        with read_image(Path(path)) as im:
            return None, im.size, im.mode
    except FileNotFoundError:  # removed between stat and open
        return MISSING, (0, 0), ""
    except DamagedImageError as e:
        return e.reason, (0, 0), ""


def probe_image(path: Path) -> Probe:
    """``(problem, (width, height), mode)`` of the file at ``path``; ``problem`` is ``None`` if it
    fully decodes, :data:`MISSING` if it does not exist, else what is wrong."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return MISSING, (0, 0), ""
    return _decode_probe(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def probe_images(paths: Iterable[Path]) -> list[Probe]:
    """:func:`probe_image` of every path, decoded on a few threads (PIL releases the GIL while
    inflating)."""
    paths = list(paths)
    if len(paths) < 16:
        return [probe_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(probe_image, paths, chunksize=64))


def image_problem(path: Path, size: tuple[int, int] | None = None,
                  mode: str | None = None) -> str | None:
    """Why the image at ``path`` is not usable, or ``None`` if it is: the single definition of a
    valid image in edm.

    Usable means: the file exists, fully decodes (:func:`read_image`), and, where given, has
    ``size`` = ``(width, height)`` and PIL ``mode`` (``"L"`` for one-channel pipelines such as
    the digits model, ``"RGB"`` for three).
    """
    problem, got_size, got_mode = probe_image(path)
    return problem or _spec_problem(got_size, got_mode, size, mode)


@dataclass
class ImageSet:
    """Generated images on disk (``images_dir/{index:06d}.png``) with their prompt items.

    ``size`` (``(width, height)``) and ``mode`` (``"L"``/``"RGB"``), when given, are part of what
    makes a file valid (see :func:`image_problem`); a file that decodes but has another size or
    mode then counts as damaged.
    """

    images_dir: Path
    items: list[PromptItem]
    size: tuple[int, int] | None = None
    mode: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [image_path(self.images_dir, it.index) for it in self.items]

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    def problems(self) -> dict[int, str]:
        """``{index: reason}`` for every item whose file is absent (:data:`MISSING`) or damaged.

        Decodes every file once per process (~4 ms per 512x512 PNG, on a few threads; unchanged
        files are cached, so a second call costs one ``stat`` per file)."""
        out = {}
        for it, (problem, got_size, got_mode) in zip(self.items, probe_images(self.paths)):
            problem = problem or _spec_problem(got_size, got_mode, self.size, self.mode)
            if problem is not None:
                out[it.index] = problem
        return out

    def missing(self) -> list[int]:
        """Indices of the items that cannot be evaluated: file absent *or damaged* (a truncated
        or zero-byte PNG counts as missing, so evaluation is never started on it)."""
        return list(self.problems())

    def damaged(self) -> dict[int, str]:
        """``{index: reason}`` for the files that exist but are not valid images."""
        return {i: r for i, r in self.problems().items() if r != MISSING}

    def load(self, i: int, mode: str | None = None) -> np.ndarray:
        """Image ``i`` (position in ``items``) as uint8 HxWxC (C=3 unless ``mode='L'``).

        Raises :class:`~edm.errors.DamagedImageError` naming the file if it does not decode or
        has another size or mode than this set's ``size``/``mode``."""
        path = self.paths[i]
        with read_image(path) as im:
            problem = _spec_problem(im.size, im.mode, self.size, self.mode)
            if problem is not None:
                raise DamagedImageError(path, problem)
            return np.asarray(im.convert(mode or "RGB"))

    def iter_batches(
        self, batch_size: int = 32, mode: str | None = None
    ) -> Iterator[tuple[torch.Tensor, list[PromptItem]]]:
        """Yield ``(uint8 [B, C, H, W], items)`` batches in item order, streamed from disk."""
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start : start + batch_size]
            arrs = [self.load(start + j, mode) for j in range(len(chunk))]
            arrs = [a[..., None] if a.ndim == 2 else a for a in arrs]
            yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous(), chunk

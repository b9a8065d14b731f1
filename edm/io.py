"""Atomic file writes: a killed job never leaves a truncated PNG or JSON behind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

_TMP_SUFFIX = ".tmp"


def _tmp_prefix(name: str) -> str:
    return f".{name}."


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so os.replace is an atomic rename on one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(folder: Path, targets: set[str]) -> list[Path]:
    """Delete the temp files a killed writer left for the files named in ``targets``.

    Only names of the form ``.{target}.<anything>.tmp`` (what :func:`_atomic` creates) whose
    target is in ``targets`` are removed: folders shared by concurrent jobs (sharded generation
    into one ``images_dir``) keep the live temp files of other jobs' targets. Returns the paths
    removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(.+)\.[^.]+" + re.escape(_TMP_SUFFIX) + "$")
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries if (m := pattern.match(e.name)) and m.group(1) in targets
                 and e.is_file(follow_symlinks=False)]
    removed = []
    for path in stale:
        try:
            os.unlink(path)
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            continue
        removed.append(Path(path))
    return removed


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    _atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def write_png(path: Path, image: Image.Image) -> None:
    _atomic(path, lambda f: image.save(f, format="PNG"))

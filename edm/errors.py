"""Named exceptions for user-facing problems.

Every error that a user can cause by a config value names the config key and, where there is a
finite set, the allowed values. They are raised before any model is loaded (see
``edm.validate``), so a bad sweep point fails in seconds instead of after hours of sampling.
"""

from __future__ import annotations

from collections.abc import Iterable


class EdmError(Exception):
    """Base class of edm's user-facing errors."""


class ConfigError(EdmError, ValueError):
    """A config value is invalid.

    Args:
        key: dotted config key, e.g. ``"method.pattern"``.
        message: what is wrong.
        allowed: the allowed values, printed in the message when given.
    """

    def __init__(self, key: str, message: str, allowed: Iterable[object] | None = None):
        self.key = key
        self.allowed = list(allowed) if allowed is not None else None
        text = f"<{key}> {message}"
        if self.allowed is not None:
            text += f" Allowed: {', '.join(map(str, self.allowed))}."
        super().__init__(text)


class MissingWeightsError(EdmError, FileNotFoundError):
    """Model or metric weights are not in the local cache (we never download at run time)."""


class UnsupportedFamily(EdmError, NotImplementedError):
    """A method does not support the model family it was applied to."""


class NothingPatchedError(EdmError, RuntimeError):
    """A runtime method matched no module: a silent no-op is a bug, so it is an error."""


class DamagedImageError(EdmError, OSError):
    """An image file does not decode or is not the image it should be (truncated, zero bytes,
    wrong size or mode). ``path`` names the file, ``reason`` says what is wrong; the fix is to
    rerun generation, which regenerates damaged images from their seeds."""

    def __init__(self, path: object, reason: str = "damaged"):
        self.path, self.reason = str(path), reason
        super().__init__(f"Damaged image {self.path}: {reason}. Rerun generation (same config) "
                         f"to regenerate it from its seed.")

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)

"""Small helpers shared by test modules (import them as ``from helpers import ...``)."""

from PIL import Image

from edm.data.images import ImageSet, PromptItem, image_path


def write_images(folder, arrays):
    """uint8 arrays -> ``folder/{i:06d}.png`` and the :class:`ImageSet` reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(image_path(folder, i))
    return ImageSet(folder, [PromptItem(i, f"prompt {i}") for i in range(len(arrays))])


class FixedHessian:
    """A calibration statistic holding a given Hessian (``.H``, ``nbytes``, ``free``), for
    feeding chosen Hessians to the structured package loop."""

    def __init__(self, H):
        self.H = H

    def nbytes(self):
        return self.H.numel() * self.H.element_size() if self.H is not None else 0

    def free(self):
        self.H = None

"""``DDPMUncondPipeline``: unconditional DDPM/DDIM sampling under the runner's call contract
(family ``ddpm``; see ``edm.models.ddpm`` for the loaders and the ``data=unconditional`` set)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DDPMUncondPipeline(DiffusionPipeline):
    """Unconditional sampling (``unet(x_t, t)``, no text) with the project's call contract.

    Like diffusers' ``DDIMPipeline``/``DDPMPipeline`` (same loop, ``eta = 0`` by default, images
    ``x0 / 2 + 0.5``), but called with the prompts of the text-to-image pipelines: the batch is
    one image per prompt, each drawn from its own generator, so an image does not depend on the
    batch it lands in. The prompt text is ignored.

    Args:
        unet: ``UNet2DModel`` predicting epsilon (``google/ddpm-cifar10-32``).
        scheduler: a diffusers scheduler; DDIM with 100 steps reproduces Diff-Pruning's and
            OBS-Diff's Table 10 protocol (``model.loader.scheduler=DDIMScheduler``).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.edm_family = "ddpm"

    @property
    def sample_size(self) -> tuple[int, int]:
        s = self.unet.config.sample_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        negative_prompt: str | list[str] | None = None,
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
        eta: float = 0.0,
        batch_size: int | None = None,
    ):
        """Sample ``len(prompt)`` images (or ``batch_size`` without prompts).

        Args:
            prompt: only its length counts (the runner's contract); the model takes no text.
            num_inference_steps: sampler steps (100 DDIM steps in the paper's protocol).
            guidance_scale: must be <= 1 (no guidance: there is no condition to guide by).
            height, width: the trained size (32 for CIFAR-10); ``None`` means that size.
            generator: one generator per image, or one for the batch.
            output_type: ``"pt"`` float ``[B, 3, H, W]`` in [0, 1], ``"np"`` ``[B, H, W, 3]``.
            negative_prompt: must be ``None``.
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": x}) -> dict``.
            eta: DDIM's eta (0 = deterministic DDIM, as ``DDIMPipeline``'s default); passed only
                to schedulers whose ``step`` takes it.
        """
        n = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else batch_size or 1
        h0, w0 = self.sample_size
        height, width = height or h0, width or w0
        if (height, width) != (h0, w0):
            raise ValueError(f"this DDPM UNet was trained at {h0}x{w0}; got {height}x{width}.")
        if guidance_scale > 1.0 or negative_prompt is not None:
            raise ValueError("an unconditional DDPM takes no guidance and no negative prompt")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images")
        device = self._execution_device
        shape = (n, self.unet.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        accepts = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepts}
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            for i, t in enumerate(self.scheduler.timesteps):
                model_in = self.scheduler.scale_model_input(latents, t)
                eps = self.unet(model_in, t).sample
                latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = out.get("latents", latents)
                bar.update()
        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

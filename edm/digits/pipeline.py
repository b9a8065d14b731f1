"""``DigitsPipeline``: text-to-image sampling for the embedded digits model.

Pixel space, one channel, no VAE. The loop is the Stable Diffusion one reduced to what a pixel
model needs, and it keeps the properties the methods of this project rely on:

* the denoiser is ``pipe.unet`` (a ``UNet2DConditionModel``) called as
  ``self.unet(latent_in, t, encoder_hidden_states=...)`` -- positional timestep, like SD;
* with classifier-free guidance the unconditional and conditional halves go through ONE UNet
  call per step (``edm.state.StepTracker`` counts calls as steps);
* ``height``/``width`` must equal the trained size. The stock SD pipeline with ``vae=None``
  silently divides by a VAE scale factor (height 16 -> 2x2 images); here it is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pt", "np", "pil")


class DigitsPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the embedded digits model.

    Args:
        unet: ``UNet2DConditionModel`` with 1 input/output channel, predicting noise (epsilon).
        scheduler: a diffusers scheduler (``DDIMScheduler`` with the training schedule).
        tokenizer: :class:`edm.digits.tokenizer.WordTokenizer` (or any tokenizer with the same
            ``__call__``).
        text_encoder: ``CLIPTextModel``; its ``last_hidden_state`` is the cross-attention context.
        mask_padding: pass the tokenizer's attention mask to the UNet as
            ``encoder_attention_mask``, so cross-attention skips the padding tokens (the layouts
            model is trained so: 4-object prompts need 32 tokens, and unmasked, the 24 pads of a
            1-object prompt took 55-85 % of the cross-attention). ``False`` for digits, like SD.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, tokenizer, text_encoder, mask_padding: bool = False):
        super().__init__()
        self.register_modules(
            unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder
        )
        self.register_to_config(mask_padding=bool(mask_padding))
        self.edm_family = "digits"

    @property
    def sample_size(self) -> tuple[int, int]:
        s = self.unet.config.sample_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def _tokens(self, prompts: list[str]):
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text-encoder hidden states ``[B, L, D]`` in the UNet's dtype."""
        ids = self._tokens(prompts).input_ids.to(self.text_encoder.device)
        hidden = self.text_encoder(ids)[0]
        return hidden.to(dtype=self.unet.dtype)

    def text_kwargs(self, prompts: list[str]) -> dict:
        """The text keywords of a UNet call for ``prompts``: ``encoder_hidden_states``, plus
        ``encoder_attention_mask`` (1 = token, 0 = padding) when ``mask_padding``."""
        kw = {"encoder_hidden_states": self.encode_prompt(prompts)}
        if self.config.mask_padding:
            kw["encoder_attention_mask"] = self._tokens(prompts).attention_mask.to(self.unet.device)
        return kw

    def _check_inputs(self, prompts, negative_prompt, height, width, output_type, generator):
        h, w = self.sample_size
        if (height, width) != (h, w):
            raise ValueError(
                f"DigitsPipeline was trained at {h}x{w}; got height={height}, width={width}. "
                f"Pass height={h}, width={w} (pixel-space model: no VAE to rescale)."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if negative_prompt is not None and len(negative_prompt) != len(prompts):
            raise ValueError(
                f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts"
            )
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.5,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        negative_prompt: str | list[str] | None = None,
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample images for ``prompt``.

        Args:
            prompt: one prompt or a list, e.g. ``"a handwritten digit seven"``.
            num_inference_steps: DDIM steps (25: quality plateaus there for this model).
            guidance_scale: classifier-free guidance; 1.5 is best for digit FID, >= 3 hurts it;
                <= 1 disables guidance (one UNet batch of conditional inputs only).
            height, width: must equal the trained size (16); ``None`` means the trained size.
            generator: one generator, or one per prompt (so each image's noise is independent
                of the batch it lands in).
            output_type: ``"pt"`` float ``[B, 1, H, W]`` in [0, 1]; ``"np"`` float
                ``[B, H, W, 1]``; ``"pil"`` list of mode-``L`` images.
            negative_prompt: replaces the empty prompt of the unconditional branch.
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": x}) -> dict``; a
                returned ``"latents"`` replaces the current latents (diffusers' convention).
            return_dict: return ``ImagePipelineOutput`` (else a tuple).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        h0, w0 = self.sample_size
        height, width = height or h0, width or w0
        self._check_inputs(prompts, negative_prompt, height, width, output_type, generator)
        device, batch = self._execution_device, len(prompts)
        do_cfg = guidance_scale > 1.0

        text = self.text_kwargs(prompts)
        if do_cfg:  # one UNet call per step for both halves
            uncond = self.text_kwargs(negative_prompt or [""] * batch)
            text = {k: torch.cat([uncond[k], v]) for k, v in text.items()}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                latent_in = torch.cat([latents] * 2) if do_cfg else latents
                latent_in = self.scheduler.scale_model_input(latent_in, t)
                eps = self.unet(latent_in, t, **text).sample
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = self.scheduler.step(eps, t, latents).prev_sample
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = out.get("latents", latents)
                bar.update()

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            from PIL import Image

            arr = (images[:, 0].cpu().numpy() * 255).round().astype(np.uint8)
            images = [Image.fromarray(a) for a in arr]  # uint8 2-D -> mode L
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

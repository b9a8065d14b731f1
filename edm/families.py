"""Architecture adapters: the one place that knows where things live inside a denoiser.

Methods never string-match class names or module paths themselves; they ask the adapter of the
pipeline's family for the denoiser, its attention blocks, and its prunable linear layers grouped
into *basic units* (layers whose inputs are independent within one forward pass, which OBS-Diff's
module packages keep together). Two architectures cover every model of the project:

* ``unet``  -- ``UNet2DConditionModel`` with ``Transformer2DModel`` attention blocks made of
  ``BasicTransformerBlock`` layers (SD1.5, SD2.1, SDXL and the embedded ``digits`` model).
* ``mmdit`` -- ``SD3Transformer2DModel`` made of ``JointTransformerBlock`` layers (SD3, SD3.5).
* ``unet2d`` -- the unconditional pixel-space ``UNet2DModel`` of DDPM (family ``ddpm``:
  ``google/ddpm-cifar10-32``, OBS-Diff's Table 10). Its self-attention is a plain ``Attention``
  inside ``AttnDown/UpBlock2D``, with no text context: no attention blocks or linear units for
  the token and layer-wise methods; Diff-Pruning prunes its channels with torch-pruning.

Model configs name a ``family`` (``digits``, ``sd15``, ``sd21``, ``sdxl``, ``sd3``); ``ARCH`` maps
it to the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from edm.errors import UnsupportedFamily

FAMILIES = ("digits", "sd15", "sd21", "sdxl", "sd3", "flux", "ddpm")
ARCH = {"digits": "unet", "sd15": "unet", "sd21": "unet", "sdxl": "unet", "sd3": "mmdit",
        "flux": "flux"}
# The families a method supports unless it says otherwise (``Method.supported_families``).
# FLUX.1 (and DDPM) are not in it: a method opts in by listing them, so none claims support
# for an architecture it was not ported to (every method but Diff-Pruning lists flux).
METHOD_FAMILIES = ("digits", "sd15", "sd21", "sdxl", "sd3")
# The unconditional DDPM UNet (issue 12): dense runs and Diff-Pruning (which lists it) only.
ARCH["ddpm"] = "unet2d"

# Schedulers a family's pipeline can run (``model.loader.scheduler``). UNet families are
# epsilon/v-prediction models: any of diffusers' ``KarrasDiffusionSchedulers`` (the set their
# pipelines declare compatible). MMDiTs are rectified-flow models: only flow-matching samplers
# (an epsilon sampler runs without error and produces noise). ``digits`` has no scheduler knob.
SCHEDULERS = {
    "unet": ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
             "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
             "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
             "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
             "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler",
             "EDMEulerScheduler"),
    "mmdit": ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"),
    # FluxPipeline passes resolution-dependent shift (mu) and sigmas: Euler flow matching only
    "flux": ("FlowMatchEulerDiscreteScheduler",),
}

# An epsilon-prediction UNet like the others (its DDPM betas are kept by from_config).
SCHEDULERS["unet2d"] = SCHEDULERS["unet"]

# Target groups a weight method may select (``method.targets``).
TARGET_GROUPS = ("attn", "ff", "context")


@dataclass
class AttentionBlock:
    """One attention block: a ``Transformer2DModel`` (UNet) or one ``JointTransformerBlock``.

    Attributes:
        name: module path inside the denoiser, e.g. ``down_blocks.1.attentions.0``.
        module: the block module.
        layers: ``(name, module)`` of its transformer layers, in forward order
            (``BasicTransformerBlock``s for UNets, the joint block itself for MMDiT).
        stage: ``down``, ``mid``, ``up`` (UNet) or ``joint`` (MMDiT).
        stage_index: index of the UNet down/up block (0 for mid and MMDiT).
        position: index of this attention block inside its stage block (UNet), block index (MMDiT).
        stage_len: how many attention blocks that stage block has.
        downsample: how many times smaller its token grid is than the latent (UNet: read from
            the structure, down blocks with a downsampler halve it and up blocks with an
            upsampler double it; MMDiT: 1, every block sees the whole patch grid).
    """

    name: str
    module: nn.Module
    layers: list[tuple[str, nn.Module]]
    stage: str
    stage_index: int
    position: int
    stage_len: int
    downsample: int = 1


def _unet_layer_units(prefix: str) -> list[list[str]]:
    # Basic units of one BasicTransformerBlock, in forward order. attn2.to_q reads the image
    # tokens and attn2.to_k/to_v the text context: independent inputs, one unit.
    return [
        [f"{prefix}.attn1.to_q", f"{prefix}.attn1.to_k", f"{prefix}.attn1.to_v"],
        [f"{prefix}.attn1.to_out.0"],
        [f"{prefix}.attn2.to_q", f"{prefix}.attn2.to_k", f"{prefix}.attn2.to_v"],
        [f"{prefix}.attn2.to_out.0"],
        [f"{prefix}.ff.net.0.proj"],
        [f"{prefix}.ff.net.2"],
    ]


# Per JointTransformerBlock, OBS-Diff's ``group_modules_with_parallelism`` rules.
_MMDIT_UNITS = [
    ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ["attn.to_out.0", "attn.to_add_out"],
    ["ff.net.0.proj", "ff_context.net.0.proj"],
    ["ff.net.2", "ff_context.net.2"],
]
_CONTEXT_SUFFIXES = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.")

# FLUX.1: double-stream blocks are MMDiT joint blocks (image and text streams, joint attention);
# single-stream blocks compute q/k/v and the MLP up-projection from one normalised input (one
# unit) and ``proj_out`` reads the attention output and the MLP activations concatenated.
_FLUX_DOUBLE_UNITS = _MMDIT_UNITS
_FLUX_SINGLE_UNITS = [["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], ["proj_out"]]


def _group_of(name: str) -> str:
    """Which target group (``attn``/``ff``/``context``) a linear belongs to. A single-stream
    ``proj_out`` mixes both and counts as ``attn`` (it is the block's output projection)."""
    if any(s in name for s in _CONTEXT_SUFFIXES):
        return "context"
    return "ff" if ".ff." in f".{name}" or name.endswith(".proj_mlp") else "attn"


class Adapter:
    """Family adapter. Use :func:`adapter` to get one."""

    arch: str = ""
    denoiser_attr: str = ""

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def attention_blocks(self, denoiser: nn.Module) -> list[AttentionBlock]:
        raise NotImplementedError

    def unit_names(self, denoiser: nn.Module) -> list[list[str]]:
        raise NotImplementedError

    def linear_units(
        self, denoiser: nn.Module, groups=("attn", "ff", "context"), blocks: range | None = None
    ) -> list[list[tuple[str, nn.Linear]]]:
        """Prunable linears as ordered basic units of ``(name, module)``.

        Args:
            groups: which target groups to keep (``attn``, ``ff``, ``context``); ``context`` is
                the MMDiT text stream (UNets have none).
            blocks: only transformer layers whose index (in forward order) is in this range;
                ``None`` keeps all. OBS-Diff's tables exclude the first and last MMDiT blocks.
        """
        bad = set(groups) - set(TARGET_GROUPS)
        if bad:
            from edm.errors import ConfigError

            raise ConfigError("method.targets", f"unknown target groups {sorted(bad)}.", TARGET_GROUPS)
        modules = dict(denoiser.named_modules())
        units = []
        for layer_idx, layer_units in enumerate(self._units_per_layer(denoiser)):
            if blocks is not None and layer_idx not in blocks:
                continue
            for unit in layer_units:
                kept = [
                    (n, modules[n])
                    for n in unit
                    if n in modules and isinstance(modules[n], nn.Linear) and _group_of(n) in groups
                ]
                if kept:
                    units.append(kept)
        return units

    def _units_per_layer(self, denoiser) -> list[list[list[str]]]:
        raise NotImplementedError

    def num_layers(self, denoiser: nn.Module) -> int:
        return len(self._units_per_layer(denoiser))


class UNetAdapter(Adapter):
    arch = "unet"
    denoiser_attr = "unet"

    def attention_blocks(self, denoiser):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        down = [2 if getattr(b, "downsamplers", None) else 1 for b in denoiser.down_blocks]
        up = [2 if getattr(b, "upsamplers", None) else 1 for b in denoiser.up_blocks]
        mid = math.prod(down)
        grid = {"down": lambda i: math.prod(down[:i]), "mid": lambda i: mid,
                "up": lambda i: mid // math.prod(up[:i])}
        blocks = []
        for name, mod in denoiser.named_modules():
            if not isinstance(mod, Transformer2DModel):
                continue
            parts = name.split(".")  # down_blocks.1.attentions.0 | mid_block.attentions.0
            if parts[0] == "mid_block":
                stage, stage_index = "mid", 0
                parent = denoiser.mid_block
            else:
                stage, stage_index = parts[0].split("_")[0], int(parts[1])
                parent = getattr(denoiser, parts[0])[stage_index]
            layers = [
                (f"{name}.transformer_blocks.{i}", b)
                for i, b in enumerate(mod.transformer_blocks)
                if isinstance(b, BasicTransformerBlock)
            ]
            blocks.append(
                AttentionBlock(
                    name=name,
                    module=mod,
                    layers=layers,
                    stage=stage,
                    stage_index=stage_index,
                    position=int(parts[-1]),
                    stage_len=len(parent.attentions),
                    downsample=grid[stage](stage_index),
                )
            )
        # named_modules() registers mid_block after up_blocks; sort into forward order.
        order = {"down": 0, "mid": 1, "up": 2}
        return sorted(blocks, key=lambda b: (order[b.stage], b.stage_index, b.position))

    def _units_per_layer(self, denoiser):
        return [
            _unet_layer_units(layer_name)
            for blk in self.attention_blocks(denoiser)
            for layer_name, _ in blk.layers
        ]


class MMDiTAdapter(Adapter):
    arch = "mmdit"
    denoiser_attr = "transformer"

    def attention_blocks(self, denoiser):
        n = len(denoiser.transformer_blocks)
        return [
            AttentionBlock(
                name=f"transformer_blocks.{i}",
                module=b,
                layers=[(f"transformer_blocks.{i}", b)],
                stage="joint",
                stage_index=0,
                position=i,
                stage_len=n,
            )
            for i, b in enumerate(denoiser.transformer_blocks)
        ]

    def _units_per_layer(self, denoiser):
        return [
            [[f"transformer_blocks.{i}.{s}" for s in unit] for unit in _MMDIT_UNITS]
            for i in range(len(denoiser.transformer_blocks))
        ]


class FluxAdapter(Adapter):
    """``FluxTransformer2DModel``: ``transformer_blocks`` (double-stream, stage ``double``) then
    ``single_transformer_blocks`` (stage ``single``), in forward order."""

    arch = "flux"
    denoiser_attr = "transformer"

    def attention_blocks(self, denoiser):
        out = []
        for stage, attr in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
            blocks = getattr(denoiser, attr)
            out += [AttentionBlock(name=f"{attr}.{i}", module=b, layers=[(f"{attr}.{i}", b)],
                                   stage=stage, stage_index=0, position=i, stage_len=len(blocks))
                    for i, b in enumerate(blocks)]
        return out

    def _units_per_layer(self, denoiser):
        return [
            [[f"{b.name}.{s}" for s in unit]
             for unit in (_FLUX_DOUBLE_UNITS if b.stage == "double" else _FLUX_SINGLE_UNITS)]
            for b in self.attention_blocks(denoiser)
        ]


class UNet2DAdapter(UNetAdapter):
    """``UNet2DModel`` (DDPM): the denoiser is ``pipe.unet`` as for the text-to-image UNets, but
    there is no ``Transformer2DModel``, so no attention blocks and no prunable linear units."""

    arch = "unet2d"

    def attention_blocks(self, denoiser):
        return []


_ADAPTERS = {"unet": UNetAdapter(), "mmdit": MMDiTAdapter(), "flux": FluxAdapter(),
             "unet2d": UNet2DAdapter()}


def adapter(family_or_pipe) -> Adapter:
    """The adapter for a family name (``sd15``...) or a loaded pipeline (read from ``edm_family``)."""
    family = family_or_pipe if isinstance(family_or_pipe, str) else family_of(family_or_pipe)
    if family not in ARCH:
        raise UnsupportedFamily(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return _ADAPTERS[ARCH[family]]


def family_of(pipe) -> str:
    """The family a pipeline was loaded as. Loaders set ``pipe.edm_family``; otherwise infer."""
    fam = getattr(pipe, "edm_family", None)
    if fam:
        return fam
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UnsupportedFamily(f"cannot tell the family of {type(pipe).__name__}")
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd15"

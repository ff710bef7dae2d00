"""DeepCache: reuse a UNet's deep features between denoising steps instead of recomputing them.

Owns the option and the UNet forward that carries it out (Ma, Fang and Wang, "DeepCache:
Accelerating Diffusion Models for Free", 2023). A UNet's skip connections are numbered from the
shallowest: branch 0 is the one from ``conv_in`` to the last up layer. Every ``interval``-th UNet
call runs the whole network and keeps the hidden state that enters the up layer of skip branch
``branch``; the calls between run only the layers above that branch (the down layers that make
skip branches 0..branch and the up layers that take them), starting the up path from the kept
state. Neighbouring steps change those deep features little, so the pictures stay close to the
full computation's, but they are not the same pixels: the option is part of an image's identity.

torch is imported inside functions, like the rest of the generation code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sd_assets.domain.errors import ModelError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# UNet features this forward does not carry out; a model using any of them cannot use the option.
UNSUPPORTED_CONFIG = ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim")


@dataclass(frozen=True)
class DeepCache:
    """Run the whole UNet every ``interval`` calls; between them, only the layers above skip
    branch ``branch`` (0 = the shallowest: fastest, furthest from the full computation)."""

    interval: int
    branch: int = 0

    def __post_init__(self) -> None:
        if self.interval < 2:
            raise ValueError(f"DeepCache's interval must be 2 or more, not {self.interval}")
        if self.branch < 0:
            raise ValueError(f"DeepCache's branch must be 0 or more, not {self.branch}")

    def describe(self) -> str:
        return f"interval {self.interval}, branch {self.branch}"


@dataclass
class _DownLayer:
    resnet: Any = None
    attention: Any = None
    downsampler: Any = None


@dataclass
class _UpLayer:
    resnet: Any
    attention: Any = None
    # The block's upsampler, after its last layer.
    upsampler: Any = None


def unet_layers(unet: Any) -> tuple[list[_DownLayer], list[_UpLayer]]:
    """The UNet as a flat list of down layers after ``conv_in`` (each makes one skip branch) and
    up layers (each takes one), in call order."""
    down: list[_DownLayer] = []
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        down.extend(_DownLayer(resnet, attention) for resnet, attention in zip(block.resnets, attentions, strict=True))
        down.extend(_DownLayer(downsampler=sampler) for sampler in block.downsamplers or [])
    up: list[_UpLayer] = []
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        layers = [_UpLayer(resnet, attention) for resnet, attention in zip(block.resnets, attentions, strict=True)]
        if block.upsamplers:
            layers[-1].upsampler = block.upsamplers[0]
        up.extend(layers)
    return down, up


def branch_count(unet: Any) -> int:
    """How many skip branches the UNet has: valid branches are 0 to this less one."""
    down, _up = unet_layers(unet)
    return 1 + len(down)


def check_unet(unet: Any, cache: DeepCache) -> None:
    """Raises ModelError when ``cache`` cannot run on ``unet``, naming the reason."""
    kinds = {type(block).__name__ for block in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]}
    reasons = sorted(kinds - set(DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS))
    reasons += [name for name in UNSUPPORTED_CONFIG if unet.config.get(name) is not None]
    if unet.config.get("center_input_sample"):
        reasons.append("center_input_sample")
    if any(getattr(block, "s1", None) for block in unet.up_blocks):
        reasons.append("FreeU")
    if reasons:
        raise ModelError(
            f"inference.deep_cache works with Stable Diffusion 1.x/2.x UNets; this UNet uses {', '.join(reasons)}"
        )
    branches = branch_count(unet)
    if not 0 <= cache.branch < branches:
        raise ModelError(
            f"inference.deep_cache.branch is {cache.branch}, but this UNet has {branches} skip branches "
            f"(0 to {branches - 1})"
        )


def unet_forward(unet: Any, layers: tuple[list[_DownLayer], list[_UpLayer]], sample, timestep, encoder_hidden_states,
                 branch: int, cached=None):  # fmt: skip
    """One UNet evaluation; returns (noise prediction, hidden state entering branch ``branch``'s up layer).

    With ``cached`` None this is the whole network, computing what ``UNet2DConditionModel.forward``
    computes for a Stable Diffusion 1.x/2.x UNet. With ``cached``, only the layers above the
    branch run, and the up path starts from ``cached``.
    """
    import torch

    down, up = layers
    timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    timesteps = timesteps.reshape(-1).to(sample.device).expand(sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    # UNet2DConditionModel passes each upsampler its output size only when the latent size is
    # not a multiple of the total upsampling factor.
    factor = 2**unet.num_upsamplers
    exact_size = any(dim % factor for dim in sample.shape[-2:])

    hidden = unet.conv_in(sample)
    skips = [hidden]
    for layer in down if cached is None else down[:branch]:
        if layer.downsampler is not None:
            hidden = layer.downsampler(hidden)
        else:
            hidden = layer.resnet(hidden, emb)
            if layer.attention is not None:
                hidden = layer.attention(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        skips.append(hidden)
    if cached is None and getattr(unet.mid_block, "has_cross_attention", False):
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    elif cached is None:
        hidden = unet.mid_block(hidden, emb)
    kept = None
    for layer in up if cached is None else up[len(up) - branch - 1 :]:
        if len(skips) == branch + 1:
            if cached is None:
                kept = hidden
            else:
                hidden = cached
        hidden = layer.resnet(torch.cat([hidden, skips.pop()], dim=1), emb)
        if layer.attention is not None:
            hidden = layer.attention(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if layer.upsampler is not None:
            hidden = layer.upsampler(hidden, skips[-1].shape[2:] if exact_size else None)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden), kept


def install(unet: Any, cache: DeepCache, compile_mode: str | None = None) -> DeepCachedUNet:
    """Make ``cache`` ``unet``'s forward (see ``DeepCachedUNet``); raises ModelError when it cannot run there."""
    cached_unet = DeepCachedUNet(unet, cache, compile_mode)
    unet.forward = cached_unet.forward
    return cached_unet


def installed(unet: Any) -> DeepCachedUNet | None:
    """The ``DeepCachedUNet`` that ``install`` made ``unet``'s forward, or None."""
    owner = getattr(unet.forward, "__self__", None)
    return owner if isinstance(owner, DeepCachedUNet) else None


class DeepCachedUNet:
    """DeepCache's UNet forward (``install`` makes it the UNet's); ``reset`` before each pipeline call.

    Call 0, ``interval``, 2 x ``interval``, ... of a pipeline call run the whole UNet; the others
    reuse what the last full call kept. With ``compile_mode`` both paths are compiled (two graphs
    per input shape) instead of the UNet as one graph.
    """

    def __init__(self, unet: Any, cache: DeepCache, compile_mode: str | None = None):
        check_unet(unet, cache)
        self.unet = unet
        self.cache = cache
        self.layers = unet_layers(unet)
        self.full_calls = 0
        self.cached_calls = 0
        self._calls = 0
        self._kept = None
        self._forward = unet_forward
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        self._output = UNet2DConditionOutput
        if compile_mode is not None:
            import torch

            self._forward = torch.compile(unet_forward, fullgraph=True, mode=compile_mode, dynamic=False)

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Both paths run eagerly inside the block (one-off calls that should compile no shape)."""
        compiled, self._forward = self._forward, unet_forward
        try:
            yield
        finally:
            self._forward = compiled

    def reset(self) -> None:
        self._calls = 0
        self._kept = None

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        extra = {name: value for name, value in kwargs.items() if value is not None}
        if args or extra:
            raise ModelError(f"inference.deep_cache cannot pass {sorted(extra) or 'extra arguments'} to the UNet")
        stale = self._kept is None or self._kept.shape[0] != sample.shape[0]
        if self._calls % self.cache.interval == 0 or stale:
            output, self._kept = self._forward(self.unet, self.layers, sample, timestep, encoder_hidden_states,
                                               self.cache.branch)  # fmt: skip
            self.full_calls += 1
        else:
            output, _ = self._forward(self.unet, self.layers, sample, timestep, encoder_hidden_states,
                                      self.cache.branch, self._kept)  # fmt: skip
            self.cached_calls += 1
        self._calls += 1
        return self._output(sample=output) if return_dict else (output,)

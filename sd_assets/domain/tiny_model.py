"""The offline ``tiny-random`` model: a complete Stable Diffusion pipeline with random weights.

Owns building it deterministically (same spec and library versions, same weights) so tests and
the demo run with no network. Its images are noise: it exercises every code path of a real
model (tokenizer, text encoder, UNet, scheduler, VAE) at a size a 2-core CPU handles in a blink.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from sd_assets.domain import library_logs

# Architecture of the tiny model; part of its revision, so changing it changes every image key.
TINY_SPEC: dict = {
    "seed": 0,
    "unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 32,
    },
    "text_encoder": {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
    },
    "scheduler": {
        "class": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}


def tiny_revision() -> str:
    """A 40-hex revision for the tiny model: the spec plus the library versions that build it."""
    identity = {
        "spec": TINY_SPEC,
        "torch": version("torch").split("+")[0],
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:40]


def _byte_vocabulary() -> list[str]:
    # CLIP's byte-level BPE maps every byte to a printable character; with each character and its
    # end-of-word form in the vocab, any text tokenizes without merges.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    # Special tokens first, so their ids match the text encoder's bos/eos/pad ids above.
    return ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]


def tiny_vocabulary() -> dict[str, int]:
    """A CLIP vocabulary generated offline: special tokens, then every byte alone and word-final."""
    return {token: index for index, token in enumerate(_byte_vocabulary())}


def build_tiny_pipeline():
    """Build the tiny Stable Diffusion pipeline in memory (float32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = TINY_SPEC
    torch.manual_seed(spec["seed"])
    unet_spec = dict(spec["unet"])
    unet = UNet2DConditionModel(**unet_spec)
    torch.manual_seed(spec["seed"] + 1)
    vae = AutoencoderKL(**spec["vae"])
    torch.manual_seed(spec["seed"] + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    scheduler_spec = {k: v for k, v in spec["scheduler"].items() if k != "class"}
    return pipeline_from_parts(unet, vae, text_encoder, PNDMScheduler(**scheduler_spec))


def pipeline_from_parts(unet, vae, text_encoder, scheduler):
    """A Stable Diffusion pipeline of the given models, with the generated CLIP tokenizer and
    no safety checker (the tiny model's, and the GPU benchmark's SD 1.5 architecture)."""
    library_logs.quiet()
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=tiny_vocabulary(), merges=[], model_max_length=77)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(folder: Path) -> None:
    """Build the tiny pipeline and save it in diffusers format (safetensors) under ``folder``."""
    import transformers

    pipeline = build_tiny_pipeline()
    transformers.utils.logging.disable_progress_bar()  # a bar for a file written in milliseconds
    pipeline.save_pretrained(folder, safe_serialization=True)

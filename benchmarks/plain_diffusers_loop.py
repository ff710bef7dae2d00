"""The baseline of benchmark 1: a plain diffusers loop, the least a script can do for the same images.

Loads the pipeline folder once, then for each prompt makes one image with its own seeded
generator and saves it as a PNG. Reads its prompts from a JSON list of
``{"prompt", "negative_prompt", "seed", "name"}`` written by ``bench_cpu.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="diffusers pipeline folder")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of prompts, seeds and names")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    args = parser.parse_args()

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.model, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for item in json.loads(args.prompts.read_text()):
        image = pipeline(
            prompt=item["prompt"],
            negative_prompt=item["negative_prompt"],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=args.width,
            height=args.height,
            generator=torch.Generator("cpu").manual_seed(item["seed"]),
        ).images[0]
        image.save(args.out / f"{item['name']}.png")


if __name__ == "__main__":
    main()

"""DeepCache's short UNet evaluations against full ones: seconds and FLOPs, side by side.

The SD 1.5 UNet architecture with random weights (as in ``bench_gpu.py``), on a CUDA GPU when
there is one and otherwise on the CPU. For each branch it times the short evaluation against the
full one, in one process, and prints both shares with what they make of an image's UNet time at
the given interval. No pipeline and no PNGs: ``bench_gpu.py`` measures images/min.

    python benchmarks/bench_deep_cache.py                      # 512x512, branches 0 1 2, interval 3
    python benchmarks/bench_deep_cache.py --smoke              # tiny UNet, 64x64: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_gpu import flops_per_image, model_configs, synchronize  # noqa: E402
from sd_assets.domain import deep_cache  # noqa: E402
from sd_assets.domain.errors import ModelError  # noqa: E402
from sd_assets.domain.prompts import GenerationSettings  # noqa: E402


def timed(function, device: str, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny model's UNet at 64x64")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (SD 1.5's latents are 1/8 of it)")
    parser.add_argument("--batch", type=int, default=1, help="images per evaluation (guidance doubles it)")
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        caches = [deep_cache.DeepCache(args.interval, branch) for branch in args.branches]
    except ValueError as exc:
        parser.error(str(exc))

    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = 64 if args.smoke else args.size
    unet_config, vae_config, _ = model_configs(not args.smoke)
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).eval()
        if dtype != torch.float32:
            unet = unet.to(dtype)
        sample = torch.randn(2 * args.batch, unet.config.in_channels, latent, latent, dtype=dtype)
        if device == "cuda":  # as the engine runs it on a GPU
            unet = unet.to(memory_format=torch.channels_last)
            sample = sample.to(memory_format=torch.channels_last)
        prompts = torch.randn(2 * args.batch, 77, unet.config.cross_attention_dim, dtype=dtype)
    try:
        for cache in caches:
            deep_cache.check_unet(unet, cache)
    except ModelError as exc:
        parser.error(str(exc))
    # FLOPs as the GPU benchmark counts them, on the meta device (a CPU's attention kernel is
    # not one the FLOP counter knows).
    settings = GenerationSettings("unet", "0" * 40, "PNDMScheduler", 50, 7.5, size, size, "")
    shares = {}
    for cache in caches:
        counted = flops_per_image(not args.smoke, dataclasses.replace(settings, deep_cache=cache))
        shares[cache.branch] = counted["unet_cached_evaluation"] / counted["unet_evaluation"]
    timestep = torch.tensor(500, device=device)
    layers = deep_cache.unet_layers(unet)
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else f" ({torch.cuda.get_device_name()})"
    print(f"{'tiny' if args.smoke else 'SD 1.5'} UNet, {size}x{size}, batch {args.batch} with guidance, "
          f"{str(dtype).removeprefix('torch.')} on {device}{threads}")  # fmt: skip
    with torch.inference_mode():
        def full():
            return deep_cache.unet_forward(unet, layers, sample, timestep, prompts, 0)

        full_seconds = timed(full, device, args.repeats)
        print(f"full evaluation: {1000 * full_seconds:.1f} ms")
        for branch in args.branches:
            _, kept = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch)

            def short(branch=branch, kept=kept):
                return deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch, kept)

            seconds, share = timed(short, device, args.repeats), shares[branch]
            n = args.interval
            print(f"branch {branch}: {1000 * seconds:.1f} ms = {seconds / full_seconds:.3f} of a full evaluation "
                  f"(FLOPs: {share:.3f}); interval {n}: {n * full_seconds / (full_seconds + (n - 1) * seconds):.2f}x "
                  f"fewer UNet seconds (FLOPs: {n / (1 + (n - 1) * share):.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

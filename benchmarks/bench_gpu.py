"""Benchmark 2: images/min through the engine vs a naive diffusers loop, at several batch sizes.

The model is the full-size Stable Diffusion 1.5 architecture built from its published
configuration with random weights (nothing is downloaded): the arithmetic per image is the real
model's, the pixels are noise. Each engine row goes through the whole style path: batched
rendering with one generator per image, PNG encoding with provenance and store writes on the
background pool. The naive baseline is the loop most people write first: fp16, batch 1, default
memory format, ``pipe(prompt).images[0].save(...)``.

    python benchmarks/bench_gpu.py                 # on a CUDA GPU: SD 1.5, 512x512, 50 steps
    python benchmarks/bench_gpu.py --smoke         # anywhere: tiny model, 64x64, 2 steps
    python benchmarks/bench_gpu.py --rows "compiled:32 compiled+qkv+inductor:32"

``--rows`` lists the engine rows as ``VARIANT:BATCH,BATCH,...`` groups. A variant is ``eager`` or
``compiled``, plus any of the engine's tunings (``sd_assets.domain.engine.Tuning``) joined by
``+``: ``qkv`` (fused q/k/v projections), ``cudnn-benchmark``, ``cudnn-attention``, and with
``compiled`` also ``inductor`` (Inductor's settings for convolution UNets), ``max-autotune``
and ``vae`` (compile the VAE decoder too). ``deepcacheN`` (or ``deepcacheNbB``) turns on
DeepCache with interval N (and branch B, default 0): it changes the pictures, so its rows are
not the same work as the others; the FLOPs it does are counted for its row. Every variant
starts from a freshly built pipeline.

On a GPU it also counts host synchronisations per denoising step for a few schedulers, and
samples GPU utilisation (NVML) during every timed row. Prints one table; ``--out FILE`` writes
it (markdown) with the raw numbers (JSON) after every row, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sd_assets.domain import deep_cache  # noqa: E402
from sd_assets.domain.deep_cache import DeepCache  # noqa: E402
from sd_assets.domain.engine import (  # noqa: E402
    LoadedPipeline,
    Tuning,
    auto_batch_size,
    configure_pipeline,
    pipeline_calls,
    render_batch,
    run_pipeline,
)
from sd_assets.domain.generation import make_style_images  # noqa: E402
from sd_assets.domain.profile import GpuProfiler  # noqa: E402
from sd_assets.domain.models import ModelRef  # noqa: E402
from sd_assets.domain.prompts import GenerationSettings, PromptRow, content_key, image_seed  # noqa: E402
from sd_assets.domain.store import LocalStore  # noqa: E402
from sd_assets.domain.tiny_model import TINY_SPEC, pipeline_from_parts  # noqa: E402

# An H100 SXM's dense fp16 tensor-core peak. The limit in images/min is this over the FLOPs of
# one image, which the benchmark counts (``flops_per_image``) rather than assumes.
H100_DENSE_FP16_TFLOPS = 989.0

# Stable Diffusion 1.5's published component configurations.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "norm_num_groups": 32,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

SUBJECTS = ["alan turing", "ada lovelace", "grace hopper", "a lighthouse at dusk", "a busy market street"]


def model_configs(full: bool) -> tuple[dict, dict, dict]:
    """UNet, VAE and text-encoder configurations: SD 1.5's, or the tiny model's for --smoke."""
    if full:
        return SD15_UNET, SD15_VAE, SD15_TEXT
    return TINY_SPEC["unet"], TINY_SPEC["vae"], TINY_SPEC["text_encoder"]


def sd15_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )


def flops_per_image(full: bool, settings: GenerationSettings) -> dict:
    """TFLOP of one UNet evaluation (the batch doubled by guidance), one VAE decode, and one image.

    Counted by torch's ``FlopCounterMode`` over the models built on the meta device (no memory,
    no arithmetic), and multiplied by the UNet evaluations the scheduler really makes (PNDM
    without its Runge-Kutta warm-up makes one more than ``steps``). With ``settings.deep_cache``
    the evaluations between full ones are counted as the shorter ones they are.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_config, vae_config, _ = model_configs(full)
    guided = 2 if settings.guidance_scale > 1 else 1
    cached_step = 0.0
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).half()
        vae = AutoencoderKL(**vae_config).half()
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.randn(guided, unet.config.in_channels, settings.height // scale, settings.width // scale,
                              dtype=torch.half)  # fmt: skip
        prompts = torch.randn(guided, 77, unet.config.cross_attention_dim, dtype=torch.half)
        timesteps = torch.tensor([500] * guided)
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, timesteps, encoder_hidden_states=prompts)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latents[:1])
        if settings.deep_cache:
            layers, branch = deep_cache.unet_layers(unet), settings.deep_cache.branch
            _, kept = deep_cache.unet_forward(unet, layers, latents, timesteps, prompts, branch)
            with FlopCounterMode(display=False) as cached_count:
                deep_cache.unet_forward(unet, layers, latents, timesteps, prompts, branch, kept)
            cached_step = cached_count.get_total_flops() / 1e12
    scheduler = sd15_scheduler()
    scheduler.set_timesteps(settings.steps)
    evaluations = len(scheduler.timesteps)
    interval = settings.deep_cache.interval if settings.deep_cache else 1
    full_evaluations = -(-evaluations // interval)
    step, decode = unet_count.get_total_flops() / 1e12, vae_count.get_total_flops() / 1e12
    image = full_evaluations * step + (evaluations - full_evaluations) * cached_step + decode
    return {"unet_evaluation": step, "unet_evaluations": evaluations, "vae_decode": decode, "image": image,
            "unet_cached_evaluation": cached_step, "cached_evaluations": evaluations - full_evaluations}  # fmt: skip


def build_pipeline(full: bool, device: str, dtype: torch.dtype):
    """A Stable Diffusion pipeline with random weights, created directly on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config, text_config = model_configs(full)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype)
        vae = AutoencoderKL(**vae_config).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)
    pipeline = pipeline_from_parts(unet, vae, text_encoder, sd15_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_rows(settings: GenerationSettings, count: int, tag: str) -> list[PromptRow]:
    rows = []
    for index in range(count):
        subject = SUBJECTS[index % len(SUBJECTS)]
        prompt = f"{subject} by Vincent Van Gogh"
        seed = image_seed(42, f"{subject}-{tag}", index)
        rows.append(PromptRow(subject, "Vincent Van Gogh", index, prompt, "", seed, content_key(settings, prompt, seed)))
    return rows


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def run_naive(pipeline, settings: GenerationSettings, count: int, folder: Path, device: str) -> dict:
    """The plain loop: one prompt per call, PIL output, PNG saved inline."""
    rows = make_rows(settings, count + 1, "naive")
    folder.mkdir(parents=True, exist_ok=True)

    def one(row: PromptRow) -> None:
        generator = torch.Generator(device=device).manual_seed(row.seed)
        image = pipeline(
            row.prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
            width=settings.width, height=settings.height, generator=generator,
        ).images[0]  # fmt: skip
        image.save(folder / f"{row.key}.png")

    one(rows[0])  # warm-up: kernels, cuDNN autotuning
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for row in rows[1:]:
        one(row)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"config": "naive diffusers loop", "batch": 1, "images": count, "seconds": seconds,
            "warmup_seconds": None, "peak_gb": peak_memory_gb(device)}  # fmt: skip


# Each variant modifier and the Tuning field it turns on; "max-autotune" sets the compile mode.
MODIFIERS = {
    "qkv": "fuse_qkv",
    "cudnn-benchmark": "cudnn_benchmark",
    "cudnn-attention": "cudnn_attention",
    "inductor": "inductor_tuning",
    "vae": "compile_vae",
    "max-autotune": "compile_mode",
}
COMPILED_ONLY = {"inductor", "vae", "max-autotune"}
# Rough warm-up of a variant's first batch on an H100 (compiling dominates): a row is skipped
# when it could not finish inside the time budget.
EXPECTED_WARMUP_SECONDS = {"eager": 15.0, "compiled": 130.0, "max-autotune": 420.0}
SYNC_CHECK_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


DEEP_CACHE_MODIFIER = re.compile(r"^deepcache(\d+)(?:b(\d+))?$")


def parse_variant(variant: str) -> tuple[bool, Tuning, DeepCache | None]:
    """'compiled+qkv+deepcache3' -> (compile the UNet?, the engine tuning, the DeepCache setting)."""
    base, *modifiers = variant.split("+")
    if base not in ("eager", "compiled"):
        raise ValueError(f"variant {variant!r} must start with 'eager' or 'compiled'")
    fields: dict = {}
    cache = None
    for modifier in modifiers:
        if match := DEEP_CACHE_MODIFIER.match(modifier):
            try:
                cache = DeepCache(int(match[1]), int(match[2] or 0))
            except ValueError as exc:
                raise ValueError(f"variant {variant!r}: {exc}") from None
            continue
        if modifier not in MODIFIERS:
            raise ValueError(
                f"variant {variant!r}: unknown modifier {modifier!r} (known: {', '.join(MODIFIERS)}, deepcacheN[bB])"
            )
        if modifier in COMPILED_ONLY and base != "compiled":
            raise ValueError(f"variant {variant!r}: {modifier!r} needs 'compiled'")
        field = MODIFIERS[modifier]
        fields[field] = "max-autotune-no-cudagraphs" if modifier == "max-autotune" else True
    return base == "compiled", Tuning(**fields), cache


def parse_rows(spec: str) -> list[tuple[str, int]]:
    """'eager:1,4 compiled+qkv:32' -> [('eager', 1), ('eager', 4), ('compiled+qkv', 32)], validated."""
    rows = []
    for group in spec.split():
        variant, _, batches = group.partition(":")
        parse_variant(variant)
        if not batches:
            raise ValueError(f"row group {group!r} needs batch sizes: VARIANT:BATCH,BATCH")
        rows.extend((variant, int(batch)) for batch in batches.split(","))
    return rows


def expected_warmup(variant: str) -> float:
    if "max-autotune" in variant.split("+"):
        return EXPECTED_WARMUP_SECONDS["max-autotune"]
    return EXPECTED_WARMUP_SECONDS[variant.split("+")[0]]


def count_host_syncs(loaded: LoadedPipeline, settings: GenerationSettings, steps: int) -> int:
    """Synchronising CUDA calls made by one batch-1 pipeline call of ``steps`` steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            render_batch(loaded, make_rows(settings, 1, "sync"), dataclasses.replace(settings, steps=steps))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def sync_check(pipeline, settings: GenerationSettings, device: str) -> list[dict]:
    """Host syncs per denoising step and per call, for each scheduler in ``SYNC_CHECK_SCHEDULERS``.

    Two calls of 3 and 6 steps: the difference divided by 3 is what each step costs, the rest
    is the call's own (prompt encoding, the final copy of the pixels to the host).
    """
    import diffusers

    original = pipeline.scheduler
    results = []
    try:
        for name in SYNC_CHECK_SCHEDULERS:
            try:
                pipeline.scheduler = getattr(diffusers, name).from_config(original.config)
                loaded = LoadedPipeline(pipeline, Path("."), device, "float16", name, False)
                render_batch(loaded, make_rows(settings, 1, "sync-warm"), dataclasses.replace(settings, steps=2))
                short, long = (count_host_syncs(loaded, settings, steps) for steps in (3, 6))
            except Exception as exc:  # one scheduler failing must not cost the benchmark's rows
                results.append({"scheduler": name, "failed": f"{exc!r}"[:200]})
                continue
            results.append({"scheduler": name, "per_step": (long - short) / 3, "per_call": 2 * short - long})
    finally:
        pipeline.scheduler = original
    return results


def run_engine(loaded: LoadedPipeline, settings: GenerationSettings, batch: int, count: int, root: Path,
               label: str) -> dict:  # fmt: skip
    """Warm one batch (compiles, when compiling), then time ``count`` images through the style path."""
    store = LocalStore(root / f"{label}-{batch}")
    ref = ModelRef("sd15-architecture-random", "0" * 40, loaded.scheduler, 0, 0)
    common = dict(style="Vincent Van Gogh", partition="Vincent Van Gogh", run_id=f"bench-{label}-{batch}",
                  batch_size=batch)  # fmt: skip
    warm_start = time.perf_counter()
    make_style_images(store, loaded, ref, settings, make_rows(settings, batch, f"warm-{label}-{batch}"), **common)
    synchronize(loaded.device)
    warmup = time.perf_counter() - warm_start
    rows = make_rows(settings, count, f"{label}-{batch}")
    reset_peak(loaded.device)
    profiler = GpuProfiler(loaded.device).start()
    try:
        start = time.perf_counter()
        report = make_style_images(store, loaded, ref, settings, rows, **common)
        synchronize(loaded.device)
        seconds = time.perf_counter() - start
    finally:  # a failed row must not leave its sampler reading the GPU through the rows after it
        profile = profiler.stop()
    written = sum(1 for _ in store.list_keys("images/"))
    assert written == count + batch, f"expected {count + batch} PNGs, found {written}"
    denoise = denoise_seconds(loaded, settings, make_rows(settings, batch, f"denoise-{label}-{batch}"))
    return {"config": f"engine, {label}", "batch": batch, "images": report.generated, "seconds": seconds,
            "warmup_seconds": warmup, "peak_gb": peak_memory_gb(loaded.device), "gpu_util_mean": profile.util_mean,
            "gpu_util_peak": profile.util_peak, "gpu_profile": profile.summary,
            "denoise_share": (denoise / batch) / (seconds / report.generated)}  # fmt: skip


def denoise_seconds(loaded: LoadedPipeline, settings: GenerationSettings, rows: list[PromptRow]) -> float:
    """One batch up to its final latents: prompt encoding and the UNet steps, no VAE, no PNGs.

    The rows run as the engine runs them: as one call on a GPU, one at a time on a CPU (so a
    compiled UNet meets only shapes it has compiled).
    """
    synchronize(loaded.device)
    start = time.perf_counter()
    for call in pipeline_calls(loaded, rows):
        run_pipeline(loaded, call, settings, output_type="latent")
    synchronize(loaded.device)
    return time.perf_counter() - start


def table(results: list[dict], naive_rate: float | None, full: bool, tflop_per_image: float) -> str:
    lines = [
        "| configuration | batch | images | seconds | images/min | vs naive | TFLOP/s | % of H100 limit | peak GPU memory | GPU util mean | denoising share | warm-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['config']} | {r['batch']} | - | - | - | - | - | - | - | - | - | {r['skipped']} |")
            continue
        rate = 60 * r["images"] / r["seconds"]
        ratio = f"{rate / naive_rate:.2f}x" if naive_rate else "-"
        achieved = rate / 60 * r.get("tflop_per_image", tflop_per_image)
        limit = f"{100 * achieved / H100_DENSE_FP16_TFLOPS:.1f}%" if full else "-"
        peak = f"{r['peak_gb']:.1f} GiB" if r["peak_gb"] is not None else "-"
        util = f"{r['gpu_util_mean']:.0f}%" if r.get("gpu_util_mean") is not None else "-"
        share = f"{100 * r['denoise_share']:.0f}%" if r.get("denoise_share") is not None else "-"
        warm = f"{r['warmup_seconds']:.1f}" if r["warmup_seconds"] is not None else "-"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['images']} | {r['seconds']:.1f} | {rate:.1f} | {ratio} | {achieved:.3g} | {limit} | {peak} | {util} | {share} | {warm} |"
        )
    return "\n".join(lines)


def sync_table(syncs: list[dict]) -> str:
    lines = ["| scheduler | host syncs per step | host syncs per call |", "|---|---:|---:|"]
    for s in syncs:
        if "failed" in s:
            lines.append(f"| {s['scheduler']} | failed: {s['failed']} | - |")
        else:
            lines.append(f"| {s['scheduler']} | {s['per_step']:g} | {s['per_call']:g} |")
    return "\n".join(lines)


def write_report(out: Path, header: str, results: list[dict], syncs: list[dict], naive_rate, full: bool, raw: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f"{header}\n\n{table(results, naive_rate, full, raw['tflop']['image'])}\n"
    if syncs:
        text += f"\n{sync_table(syncs)}\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({**raw, "results": results, "host_syncs": syncs}, indent=1))


DEFAULT_ROWS = "eager:1,4,8,16,32 compiled:8,16,32,4,1"
SMOKE_ROWS = "eager:1,2 eager+qkv:2 eager+deepcache2:2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 2 steps; runs on CPU")
    parser.add_argument("--rows", default=None,
                        help=f"engine rows, 'VARIANT:BATCH,... ...' (default '{DEFAULT_ROWS}'; smoke '{SMOKE_ROWS}')")
    parser.add_argument("--images", type=int, default=None, help="images per row at least (default 16; smoke 2)")
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop (default 8)")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="skip rows that could not finish by then")
    parser.add_argument("--no-sync-check", action="store_true", help="skip counting host syncs per step (GPU only)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) and raw JSON here")
    args = parser.parse_args(argv)

    full = not args.smoke
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if full and device != "cuda":
        parser.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
    try:
        plan = parse_rows(args.rows or (DEFAULT_ROWS if full else SMOKE_ROWS))
    except ValueError as exc:
        parser.error(str(exc))
    dtype = torch.float16 if device == "cuda" else torch.float32
    min_images = args.images or (16 if full else 2)
    naive_images = args.naive_images or (8 if full else 2)
    settings = GenerationSettings(
        model_id="sd15-architecture-random", model_revision="0" * 40, scheduler="PNDMScheduler",
        steps=50 if full else 2, guidance_scale=7.5, width=512 if full else 64, height=512 if full else 64,
        negative_prompt="",
    )  # fmt: skip
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"device: {device_name}; torch {torch.__version__}; {'SD 1.5 architecture' if full else 'tiny model'}, "
              f"{settings.width}x{settings.height}, {settings.steps} steps, guidance {settings.guidance_scale}")  # fmt: skip
    print(header, flush=True)
    flops = flops_per_image(full, settings)
    raw = {"device": device_name, "torch": torch.__version__, "rows": args.rows, "tflop": flops}
    limit = 60 * H100_DENSE_FP16_TFLOPS / flops["image"]
    print(f"counted: {flops['unet_evaluation']:.4g} TFLOP per UNet evaluation (guidance doubles the batch) x "
          f"{flops['unet_evaluations']} + {flops['vae_decode']:.4g} TFLOP VAE decode = {flops['image']:.4g} TFLOP per "
          f"image" + (f"; H100 limit {limit:.0f} images/min at {H100_DENSE_FP16_TFLOPS:g} TFLOP/s" if full else ""),
          flush=True)  # fmt: skip

    build_start = time.perf_counter()
    pipeline = build_pipeline(full, device, dtype)
    print(f"built pipeline with random weights in {time.perf_counter() - build_start:.1f} s", flush=True)
    results: list[dict] = []
    syncs: list[dict] = []
    naive_rate = None

    def record(result: dict) -> None:
        results.append(result)
        if args.out:
            write_report(args.out, header, results, syncs, naive_rate, full, raw)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        naive = run_naive(pipeline, settings, naive_images, root / "naive", device)
        naive_rate = 60 * naive["images"] / naive["seconds"]
        record(naive)
        print(f"naive loop: {naive_rate:.1f} images/min", flush=True)

        if device == "cuda" and not args.no_sync_check:
            syncs.extend(sync_check(pipeline, settings, device))
            print(sync_table(syncs), flush=True)
        else:
            why = "--no-sync-check" if device == "cuda" else "CUDA only"
            print(f"host syncs per step: not counted ({why})", flush=True)

        pipeline = configure_pipeline(pipeline, device)
        loaded = LoadedPipeline(pipeline, root, device, str(dtype).removeprefix("torch."), "PNDMScheduler", False)
        raw["auto_batch_size"] = auto_batch_size(loaded, settings)
        print(f"auto batch size on this device: {raw['auto_batch_size']}", flush=True)
        del pipeline, loaded
        current: tuple[str, LoadedPipeline] | None = None
        for label, batch in plan:
            # A new variant warms up; so does a new batch shape of a compiled one (it compiles again).
            spent = time.perf_counter() - started
            if spent + expected_warmup(label) > args.budget_seconds:
                record({"config": f"engine, {label}", "batch": batch, "skipped": "skipped: time budget"})
                print(f"{label} batch {batch}: skipped (time budget: {spent:.0f} s spent + about "
                      f"{expected_warmup(label):.0f} s to warm up > --budget-seconds {args.budget_seconds:g})",
                      flush=True)  # fmt: skip
                continue
            if current is None or current[0] != label:
                current = None
                gc.collect()
                torch._dynamo.reset()
                if device == "cuda":
                    torch.cuda.empty_cache()
                compile_unet, tuning, cache = parse_variant(label)
                row_settings = dataclasses.replace(settings, deep_cache=cache)
                row_tflop = flops_per_image(full, row_settings)["image"]
                pipeline = configure_pipeline(build_pipeline(full, device, dtype), device, compile_unet, tuning, cache)
                dtype_name = str(dtype).removeprefix("torch.")
                current = (label, LoadedPipeline(pipeline, root, device, dtype_name, "PNDMScheduler", compile_unet,
                                                 tuning=tuning))  # fmt: skip
                del pipeline
            count = max(2 * batch, min_images)
            count = -(-count // batch) * batch
            try:
                result = run_engine(current[1], row_settings, batch, count, root, label)
                result["tflop_per_image"] = row_tflop
            except Exception as exc:  # a failed row is reported, the rest still run
                record({"config": f"engine, {label}", "batch": batch, "skipped": f"failed: {exc!r}"[:200]})
                print(f"{label} batch {batch}: FAILED {exc!r}", flush=True)
                continue
            record(result)
            rate = 60 * result["images"] / result["seconds"]
            print(f"{label} batch {batch}: {rate:.1f} images/min ({result['images']} images, "
                  f"warm-up {result['warmup_seconds']:.1f} s, denoising {100 * result['denoise_share']:.0f}% of the "
                  f"time per image; {result['gpu_profile']})", flush=True)  # fmt: skip

    print()
    print(table(results, naive_rate, full, flops["image"]))
    failed = [r for r in results if r.get("skipped", "").startswith("failed")]
    if failed:
        print(f"{len(failed)} row(s) failed", file=sys.stderr)
    if all(r.get("skipped") for r in results[1:]):
        if not failed:
            print(f"no engine row ran: raise --budget-seconds ({args.budget_seconds:g}), or give rows that fit it",
                  file=sys.stderr)  # fmt: skip
        return 1
    best = max((r for r in results if not r.get("skipped")), key=lambda r: r["images"] / r["seconds"])
    best_rate = 60 * best["images"] / best["seconds"]
    # As in the table: the row's own FLOPs per image (fewer with DeepCache) at its rate, against the peak.
    best_share = best_rate / 60 * best.get("tflop_per_image", flops["image"]) / H100_DENSE_FP16_TFLOPS
    print(f"\nbest: {best['config']} batch {best['batch']}: {best_rate:.1f} images/min, "
          f"{best_rate / naive_rate:.2f}x the naive loop" +
          (f", {100 * best_share:.1f}% of the H100 limit" if full else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

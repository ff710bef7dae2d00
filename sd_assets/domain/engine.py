"""The generation engine: a loaded pipeline turning prompt rows into pixels, batch after batch.

Owns device and dtype choice, loading a pipeline once per process, the batch size (given, or
``auto``: the largest that fits, found once and remembered), one ``torch.Generator`` per image
(so an image's starting noise, and so its picture, do not depend on the batch it landed in), and
handing finished pixels to a bounded background pool that encodes and stores them while the GPU
works on the next batch.

torch and diffusers are imported inside functions: a run with nothing to generate never pays
for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_assets.domain import deep_cache as deep_caching
from sd_assets.domain import library_logs
from sd_assets.domain.deep_cache import DeepCache
from sd_assets.domain.devices import cuda_index
from sd_assets.domain.errors import ModelError, SdAssetsError
from sd_assets.domain.node_locks import hold_lock
from sd_assets.domain.prompts import GenerationSettings, PromptRow
from sd_assets.domain.schedulers import USUAL_SCHEDULERS, web_ui_name
from sd_assets.domain.store import atomic_write

_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:<index>'"


def is_device_name(requested: str) -> bool:
    """Whether ``requested`` is a device ``pick_device`` takes (one of ``DEVICE_NAMES``); it looks
    for no GPU, so a setting can be checked before anything runs."""
    return bool(_DEVICE_PATTERN.fullmatch(requested))


def pick_device(requested: str = "auto") -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'; 'cpu', 'cuda', 'cuda:<i>' pass through."""
    if not is_device_name(requested):
        raise SdAssetsError(f"device {requested!r} is not one of {DEVICE_NAMES}")
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SdAssetsError(f"device {requested!r} asked for, but no CUDA GPU is visible to this process")
        visible = torch.cuda.device_count() if requested.startswith("cuda") else 0
        if visible and cuda_index(requested) >= visible:  # else torch fails later, in .to()
            seen = "1 CUDA GPU, cuda:0" if visible == 1 else f"{visible} CUDA GPUs, cuda:0 to cuda:{visible - 1}"
            raise SdAssetsError(
                f"device {requested!r} asked for, but this process sees {seen} (numbered from 0 among those "
                "CUDA_VISIBLE_DEVICES shows)"
            )
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_device_count() -> int:
    """How many CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count()


def pick_dtype(device: str, requested: str = "auto") -> str:
    """fp16 on GPUs, fp32 on CPU (half precision is slower there), unless asked otherwise."""
    if requested != "auto":
        return _DTYPES[requested]
    return "float32" if device == "cpu" else "float16"


@dataclass(frozen=True)
class Tuning:
    """GPU speed settings beyond the engine's defaults, all off by default.

    ``benchmarks/bench_gpu.py`` measures them side by side (docs/PERFORMANCE.md). Only
    ``compile_vae`` paid on a GPU so far, and a grid can ask for it (``inference.compile_vae``);
    the others are there for the benchmark. The two cuDNN switches act on GPUs only; the compile
    settings act only with compile on.
    """

    # One matmul for q, k and v in every attention layer (diffusers' ``fuse_qkv_projections``).
    fuse_qkv: bool = False
    # Let cuDNN time its convolution algorithms once per new input shape (batches repeat shapes).
    cudnn_benchmark: bool = False
    # scaled_dot_product_attention through cuDNN's fused attention first (fast on Hopper).
    cudnn_attention: bool = False
    # With compile: Inductor treats 1x1 convolutions as matmuls, tunes its kernels by
    # coordinate descent, and does not fuse epilogues into matmuls.
    inductor_tuning: bool = False
    # The UNet's torch.compile mode (with compile on). CUDA-graph modes are left out on purpose:
    # schedulers keep earlier UNet outputs, which a graph replay would overwrite.
    compile_mode: str = "default"
    # Also compile the VAE decoder (with compile on).
    compile_vae: bool = False

    def __post_init__(self) -> None:
        check_compile_mode(self.compile_mode)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise SdAssetsError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")


@dataclass
class LoadedPipeline:
    """A pipeline on its device, with what it took to get it there."""

    pipeline: Any
    folder: Path
    device: str
    dtype: str
    scheduler: str
    compiled: bool
    # (batch size, width, height) already run once: with ``compiled``, a new shape compiles first.
    warmed_shapes: set = field(default_factory=set)
    tuning: Tuning = field(default_factory=Tuning)


# One pipeline a device: loading another (a new scheduler, dtype, compile or DeepCache setting) on the
# same device lets the one before go, or a long-lived process (the demo, a benchmark) kept a copy on
# the GPU for each setting it ever ran.
_PIPELINES: dict[tuple, LoadedPipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def load_pipeline(
    folder: Path,
    device: str,
    dtype: str,
    scheduler: str | None = None,
    compile_unet: bool = False,
    safety_checker: bool = False,
    variant: str | None = None,
    tuning: Tuning | None = None,
    deep_cache: DeepCache | None = None,
) -> LoadedPipeline:
    """Load a diffusers Stable Diffusion folder once per process and configure it for speed.

    Args:
        folder: a diffusers-format pipeline folder (``model_index.json`` at its root).
        device: 'cpu', 'cuda' or 'cuda:<i>'.
        dtype: 'float32', 'float16' or 'bfloat16'.
        scheduler: a diffusers scheduler class name to use instead of the model's own.
        compile_unet: wrap the UNet in ``torch.compile`` (first batch of each shape compiles).
        safety_checker: keep the model's safety checker (off unless asked: it costs a CLIP pass).
        variant: the weights variant the folder holds ('fp16' for ``*.fp16.safetensors``), or None.
        tuning: GPU speed settings beyond the defaults (see ``Tuning``).
        deep_cache: reuse the UNet's deep features between steps (``deep_cache.DeepCache``).
    """
    tuning = tuning or Tuning()
    cache_key = (str(folder), device, dtype, scheduler, compile_unet, safety_checker, variant, tuning, deep_cache)
    with _PIPELINES_LOCK:
        if cache_key in _PIPELINES:
            return _PIPELINES[cache_key]
        _let_go_of_pipelines_on(device)
        library_logs.quiet()
        import diffusers
        import torch
        import transformers

        # Loading from a local folder takes a second or two; its progress bars only fill the run's log.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        chosen_scheduler = scheduler_class(scheduler) if scheduler else None
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "variant": variant}
        if not safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipeline = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load a Stable Diffusion pipeline from {folder}: {exc}. If its files were damaged, "
                "materialize model_weights (or run the whole generate_images job): it checks the cached model "
                "against its manifest and fetches it again"
            ) from exc
        if chosen_scheduler is not None:
            pipeline.scheduler = chosen_scheduler.from_config(pipeline.scheduler.config)
        if safety_checker and pipeline.safety_checker is None:
            # Its images would be keyed and recorded as checked without being checked.
            raise ModelError(f"the model in {folder} has no safety checker; set inference.safety_checker: false")
        pipeline = configure_pipeline(pipeline, device, compile_unet, tuning, deep_cache)
        loaded = LoadedPipeline(
            pipeline=pipeline,
            folder=Path(folder),
            device=device,
            dtype=dtype,
            scheduler=type(pipeline.scheduler).__name__,
            compiled=compile_unet,
            tuning=tuning,
        )
        _PIPELINES[cache_key] = loaded
        return loaded


def _let_go_of_pipelines_on(device: str) -> None:
    """Drop the cached pipelines on ``device`` (the caller holds ``_PIPELINES_LOCK``). One still
    rendering in another thread lives on until that thread lets it go."""
    stale = [key for key, loaded in _PIPELINES.items() if loaded.device == device]
    if not stale:
        return
    for key in stale:
        del _PIPELINES[key]
    gc.collect()  # a pipeline's modules refer to each other: without it the memory waits for a later collection
    _release_cached_memory(device)


def software_versions() -> str:
    """The libraries that compute an image's pixels, as its provenance records them: transformers
    too, whose text encoder computes the embeddings the UNet is conditioned on."""
    import diffusers
    import torch
    import transformers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"


def cpu_threads(device: str) -> int:
    """The threads torch computes an image's pixels with on ``device``: 0 on a GPU, where they compute none."""
    import torch

    return torch.get_num_threads() if device == "cpu" else 0


def scheduler_class(name: str):
    """The diffusers scheduler class ``name``; a ModelError with the close names, or with the
    library it needs (diffusers names such a class but leaves it a placeholder without that)."""
    import diffusers

    found = getattr(diffusers, name, None)
    if isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin):
        # What Stable Diffusion's pipeline steps its scheduler through. diffusers' schedulers for other
        # pipelines (flow matching, Wuerstchen, score SDE...) lack one of them, and would fail in the
        # first batch with an AttributeError from deep inside the pipeline.
        lacking = [part for part in ("set_timesteps", "scale_model_input", "step", "order") if not hasattr(found, part)]
        if lacking:
            raise ModelError(
                f"inference.scheduler {name!r} is made for other diffusers pipelines than Stable Diffusion's "
                f"(it has no {' or '.join(lacking)}); Stable Diffusion's usual ones are {USUAL_SCHEDULERS}"
            )
        return found
    missing = [backend for backend in getattr(found, "_backends", ()) if backend != "torch"]
    if missing:
        raise ModelError(f"inference.scheduler {name!r} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    web_ui = web_ui_name(name)
    if web_ui:
        raise ModelError(f"inference.scheduler {name!r} is {web_ui}")
    # Compared without the common "Scheduler", which made every misspelt name look close to all of them.
    stems = {n.casefold().removesuffix("scheduler"): n for n in dir(diffusers) if n.endswith("Scheduler")}
    typed = name.casefold().removesuffix("scheduler")
    close = sorted(n for stem, n in stems.items() if typed and stem.startswith(typed))[:3]
    close = close or [stems[stem] for stem in difflib.get_close_matches(typed, list(stems), n=3)]
    hint = f"did you mean {' or '.join(close)}?" if close else f"Stable Diffusion's usual ones are {USUAL_SCHEDULERS}"
    raise ModelError(f"inference.scheduler {name!r} is not a diffusers scheduler class; {hint}")


def configure_pipeline(pipeline: Any, device: str, compile_unet: bool = False, tuning: Tuning | None = None,
                       deep_cache: DeepCache | None = None) -> Any:  # fmt: skip
    """Move a pipeline to its device and set it up for throughput.

    On GPUs the UNet and VAE use channels_last (faster convolutions on tensor cores); attention
    is PyTorch's scaled_dot_product_attention, diffusers' default with torch 2. ``compile_unet``
    wraps the UNet in ``torch.compile`` (each new batch shape compiles on first use). With
    ``deep_cache`` the UNet's forward becomes DeepCache's (compiled, with ``compile_unet``). ``tuning``
    adds the settings a GPU benchmark measures one by one; ``cudnn_benchmark`` and
    ``inductor_tuning`` are process-wide switches, set here for every pipeline that follows.
    """
    import torch

    tuning = tuning or Tuning()
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    if tuning.fuse_qkv:
        pipeline.fuse_qkv_projections()
    if device != "cpu":
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = tuning.cudnn_benchmark
    if compile_unet:
        set_inductor_tuning(tuning.inductor_tuning)
        allow_recompiles()  # the UNet, DeepCache's paths and the VAE decoder: each batch shape is a recompile
    if deep_cache is not None:
        deep_caching.install(pipeline.unet, deep_cache, tuning.compile_mode if compile_unet else None)
    elif compile_unet:
        pipeline.unet = compiled_unet(pipeline.unet, tuning.compile_mode)
    if compile_unet and tuning.compile_vae:
        decoder = pipeline.vae.decoder
        pipeline.vae.decoder = torch.compile(decoder, fullgraph=True, mode=tuning.compile_mode, dynamic=False)
    return pipeline


@contextlib.contextmanager
def uncompiled(pipeline: Any) -> Iterator[None]:
    """Inside the block the pipeline runs its UNet and VAE decoder eagerly, for one-off calls
    (the batch-size probe) that should compile no batch shape of their own: a compiled call of a
    new shape costs a minute or more on a GPU."""
    unet, decoder = pipeline.unet, pipeline.vae.decoder
    cached_unet = deep_caching.installed(unet)  # with DeepCache the UNet stays a plain module; its paths compile
    pipeline.unet = getattr(unet, "_orig_mod", unet)
    pipeline.vae.decoder = getattr(decoder, "_orig_mod", decoder)
    try:
        with cached_unet.uncompiled() if cached_unet is not None else contextlib.nullcontext():
            yield
    finally:
        pipeline.unet, pipeline.vae.decoder = unet, decoder


def set_inductor_tuning(enabled: bool) -> None:
    """Inductor's settings for convolution-heavy diffusion UNets, or Inductor's own defaults."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = enabled
    inductor.coordinate_descent_tuning = enabled
    inductor.epilogue_fusion = not enabled


def compiled_unet(unet: Any, mode: str = "default") -> Any:
    """``torch.compile`` of a UNet as one graph; each new batch shape compiles on first use, for
    that shape alone (``dynamic=False``: by default a second shape would recompile the graph for
    any batch size, slower kernels for every batch after it)."""
    check_compile_mode(mode)
    import torch

    allow_recompiles()
    return torch.compile(unet, fullgraph=True, mode=mode, dynamic=False)


# Batch shapes one process may compile a function for: halving after running out of memory, styles
# with fewer images than a batch and other image sizes each add one (DeepCache's two paths, two).
# Past dynamo's default of 8 a compile with fullgraph=True is a hard error, not a slower call.
RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Let dynamo compile ``RECOMPILE_LIMIT`` shapes of one function in this process."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


@contextlib.contextmanager
def attention_backend(loaded: LoadedPipeline) -> Iterator[None]:
    """cuDNN attention first, then PyTorch's usual order, when the tuning asks for it on a GPU."""
    if not (loaded.tuning.cudnn_attention and loaded.device != "cpu"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


@dataclass(frozen=True)
class OverlongPrompts:
    """The prompts and negative prompts of a style's rows that are longer than the text encoder
    reads. The pipeline would cut them at ``limit`` tokens, and a picture filed under the whole
    prompt would show only its start: with the style at the end, every style the same picture."""

    limit: int
    tokens: dict[str, int]  # each such text: its length in tokens
    # The tokenizer reads a token a letter (no word pieces), as the tiny-random demo model's does.
    by_letter: bool = False

    def refuses(self, row: PromptRow) -> bool:
        return row.prompt in self.tokens or row.negative_prompt in self.tokens

    def reason(self, row: PromptRow) -> str:
        """Why ``row`` is refused, in a few words for its place in the gallery."""
        what, text = ("prompt", row.prompt) if row.prompt in self.tokens else ("negative prompt", row.negative_prompt)
        return f"its {what} is {self.tokens[text]} tokens, over the {self.limit} the text encoder reads"

    def message(self, style: str, refused: Sequence[PromptRow], made: int) -> str:
        """What a run that made ``made`` other images and not ``refused`` tells the user about them."""
        from sd_assets.domain.gallery import count  # only here: the engine otherwise needs nothing of the pages
        negatives = sorted({row.negative_prompt for row in refused} & self.tokens.keys())
        named = [f"the grid's negative prompt ({self.tokens[negative]} tokens)" for negative in negatives]
        for prompt, subject in {row.prompt: row.subject for row in refused if row.prompt in self.tokens}.items():
            shown = subject if len(subject) <= 60 else subject[:57] + "..."
            named.append(f"the prompt of {shown!r} ({self.tokens[prompt]} tokens)")
        listed = "; ".join(named[:5]) + (f"; and {len(named) - 5} more" if len(named) > 5 else "")
        letters = (
            f" (this model's tokenizer reads a token a letter, as the demo's tiny-random does: about {self.limit - 2} "
            "characters of prompt, spaces not counted, where a real model's reads most words as one token)"
        )
        cut = []
        if len(named) > len(negatives):
            cut.append(
                "each picture would show only the start of the prompt it is filed under (a style at the end is "
                "lost: every style, the same picture)"
            )
        if negatives:
            cut.append("the end of the negative prompt would steer no picture, though each would record it")
        return (
            f"{style}: the text encoder reads {self.limit} tokens of a prompt{letters if self.by_letter else ''}, "
            f"and these are longer: {listed}. The pipeline would cut them: {'; and '.join(cut)}. Shorten them (the "
            f"subject lists, or the grid's prompt template or negative prompt) and run again. Not made: "
            f"{count(len(refused), 'image')} of the prompts above; made: {count(made, 'other image')} of the style"
        )


def overlong_prompts(loaded: LoadedPipeline, rows: Sequence[PromptRow]) -> OverlongPrompts:
    """Which prompts and negative prompts of ``rows`` are longer than the text encoder reads."""
    tokenizer = loaded.pipeline.tokenizer
    limit = tokenizer.model_max_length
    texts = {text for row in rows for text in (row.prompt, row.negative_prompt)}
    # verbose=False: counting a long prompt's tokens is the point, not the mistake transformers warns of.
    counts = {text: len(tokenizer(text, verbose=False).input_ids) for text in texts}
    overlong = {text: tokens for text, tokens in counts.items() if tokens > limit}
    word = "portrait"  # one token for CLIP's tokenizer; a token a letter, and start and end tokens, for the tiny one
    by_letter = bool(overlong) and len(tokenizer(word).input_ids) == len(word) + 2
    return OverlongPrompts(limit, overlong, by_letter)


def render_batch(loaded: LoadedPipeline, rows: Sequence[PromptRow], settings: GenerationSettings):
    """Generate one batch; returns uint8 pixels, shape (len(rows), height, width, 3), on the CPU.

    Each image gets its own generator seeded with its row's seed, so its starting noise is the
    same whichever batch it is in. On a CPU the rows are rendered one at a time: batched kernels
    sum in another order, which can move a few 8-bit values by one level, and one row at a time
    is no slower there; so on a CPU an image's pixels are exactly those of any other batching. On
    a GPU the batch runs as one, identical up to kernel nondeterminism.
    """
    return render_checked(loaded, rows, settings)[0]


def render_checked(loaded: LoadedPipeline, rows: Sequence[PromptRow], settings: GenerationSettings):
    """``render_batch``'s pixels, and for each image whether the model's safety checker flagged
    it (and blacked it out); all False when the pipeline has no safety checker."""
    import numpy as np

    rendered = [_render(loaded, call, settings) for call in pipeline_calls(loaded, rows)]
    if len(rendered) == 1:
        return rendered[0]
    return np.concatenate([pixels for pixels, _ in rendered]), [flag for _, flags in rendered for flag in flags]


def pipeline_calls(loaded: LoadedPipeline, rows: Sequence[PromptRow]) -> list[list[PromptRow]]:
    """How a batch goes through the pipeline: one call on a GPU, one call per row on a CPU
    (see ``render_batch``)."""
    if loaded.device == "cpu":
        return [[row] for row in rows]
    return [list(rows)]


def run_pipeline(loaded: LoadedPipeline, rows: Sequence[PromptRow], settings: GenerationSettings,
                 output_type: str = "pt"):  # fmt: skip
    """One pipeline call for ``rows``, each with its own seeded generator, under the tuning's
    attention backend; returns the pipeline's output (``output_type`` as diffusers takes it)."""
    import torch

    cached_unet = deep_caching.installed(loaded.pipeline.unet)
    loaded_with = cached_unet.cache if cached_unet else None
    if loaded_with != settings.deep_cache:
        raise SdAssetsError(
            f"the pipeline was loaded with deep_cache {loaded_with}, "
            f"but the images' settings ask for {settings.deep_cache}"
        )
    if cached_unet is not None:
        cached_unet.reset()
    # CPU generators on every device: CUDA's generator draws other numbers from the same seed, and
    # a content key names one picture wherever it is made. diffusers draws the starting noise on
    # the CPU and moves it (one small copy a batch; schedulers that add noise each step copy each step).
    generators = [torch.Generator(device="cpu").manual_seed(row.seed) for row in rows]
    with torch.inference_mode(), attention_backend(loaded):
        return loaded.pipeline(
            prompt=[row.prompt for row in rows],
            negative_prompt=[row.negative_prompt for row in rows] if settings.guidance_scale > 1 else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=settings.width,
            height=settings.height,
            generator=generators,
            output_type=output_type,
        )


def _render(loaded: LoadedPipeline, rows: Sequence[PromptRow], settings: GenerationSettings):
    import torch

    output = run_pipeline(loaded, rows, settings)
    flagged = [bool(flag) for flag in output.nsfw_content_detected or [False] * len(rows)]
    with torch.inference_mode():
        # Quantise on the device: one small uint8 copy per batch crosses to the host. In float32,
        # as diffusers' own PIL output does: in half precision a few values round to other levels.
        pixels = output.images.float().mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return pixels.cpu().numpy(), flagged


class BoundedWriter:
    """A thread pool whose queue holds at most ``max_pending`` tasks: submit blocks past that.

    Encoding PNGs and uploading them overlaps the next batch on the GPU, while memory stays flat
    however far generation runs ahead.
    """

    def __init__(self, workers: int = 4, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sd-assets-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self.max_pending = max_pending
        self.peak_pending = 0
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self._slots.acquire()
        with self._lock:
            self._pending += 1
            self.peak_pending = max(self.peak_pending, self._pending)
        future = self._pool.submit(function, *args)
        future.add_done_callback(self._release)
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        self._futures.append(future)

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1
        self._slots.release()

    def raise_first_error(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def close(self) -> None:
        """Wait for every task; re-raise the first task error."""
        self._pool.shutdown(wait=True)
        self.raise_first_error()

    def __enter__(self) -> BoundedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class GenerationStats:
    generated: int = 0
    first_batch_seconds: float | None = None
    # With torch.compile: time of the batches that compiled a new shape, less what running them
    # warm would have taken (estimated per image from the other batches).
    compile_seconds: float = 0.0
    # Extra images rendered (and thrown away) to fill a short last batch; see ``rows_to_render``.
    padded: int = 0
    # The batch size the last batch ran at: smaller than asked when a GPU ran out of memory.
    batch_size: int = 0
    # The images of the first batch that ran out of memory (0: none did).
    out_of_memory_rows: int = 0


def compile_seconds(cold: Sequence[tuple[int, float]], warm: Sequence[tuple[int, float]]) -> float:
    """Time spent compiling: what the batches of a new shape (``cold``, as (images, seconds))
    took beyond what their images cost in the warm batches; all of their time without warm ones."""
    warm_images = sum(n for n, _ in warm)
    warm_per_image = sum(t for _, t in warm) / warm_images if warm_images else 0.0
    return sum(max(t - n * warm_per_image, 0.0) for n, t in cold)


def generate(
    loaded: LoadedPipeline,
    rows: Sequence[PromptRow],
    settings: GenerationSettings,
    batch_size: int,
    on_image: Callable[[PromptRow, Any, bool], None],
    writer: BoundedWriter,
    on_progress: Callable[[int, int, float], None] | None = None,
    on_smaller_batches: Callable[[int, int], None] | None = None,
) -> GenerationStats:
    """Render ``rows`` in batches; each image's pixels, and whether the safety checker flagged
    it, go to ``on_image`` on the writer's pool.

    ``on_progress(done, total, elapsed_seconds)`` is called after each batch. A GPU that runs
    out of memory goes on at half the rows of the batch that did not fit (an image's
    pixels do not depend on its batch, up to kernel nondeterminism), calling
    ``on_smaller_batches(old, new)``; with one row, or on a CPU (one row a call whatever the
    batch), running out of memory is a SdAssetsError saying what to make smaller.
    """
    stats = GenerationStats(batch_size=batch_size)
    cold: list[tuple[int, float]] = []
    warm: list[tuple[int, float]] = []
    start = time.perf_counter()
    offset = 0
    while offset < len(rows):
        batch_size = stats.batch_size
        batch = rows[offset : offset + batch_size]
        rendered = rows_to_render(loaded, batch, batch_size, settings)
        # The shape the UNet sees (on a CPU, one row at a time whatever the batch).
        shape = (len(pipeline_calls(loaded, rendered)[0]), settings.width, settings.height)
        batch_start = time.perf_counter()
        try:
            pixels, flagged = render_checked(loaded, rendered, settings)
        except RuntimeError as exc:  # torch.OutOfMemoryError on a GPU is one too
            if not is_out_of_memory(exc):
                raise
            if loaded.device == "cpu" or len(rendered) == 1:
                raise SdAssetsError(out_of_memory_message(loaded, settings)) from None
            # Half the rows that did not fit: a short batch (the last, or a style's few images)
            # halved from the batch size would be tried again whole until that fell below it.
            stats.batch_size = (len(rendered) + 1) // 2
            stats.out_of_memory_rows = stats.out_of_memory_rows or len(rendered)
        if stats.batch_size < batch_size:  # out of the except block: the failed batch's tensors are freed now
            _release_cached_memory(loaded.device)
            if on_smaller_batches is not None:
                on_smaller_batches(batch_size, stats.batch_size)
            continue
        batch_seconds = time.perf_counter() - batch_start
        stats.padded += len(rendered) - len(batch)
        if stats.first_batch_seconds is None:
            stats.first_batch_seconds = batch_seconds
        (cold if loaded.compiled and shape not in loaded.warmed_shapes else warm).append((len(rendered), batch_seconds))
        loaded.warmed_shapes.add(shape)
        for row, image, flag in zip(batch, pixels[: len(batch)], flagged[: len(batch)], strict=True):
            writer.submit(on_image, row, image, flag)
        writer.raise_first_error()
        stats.generated += len(batch)
        offset += len(batch)
        if on_progress is not None:
            on_progress(stats.generated, len(rows), time.perf_counter() - start)
    stats.compile_seconds = compile_seconds(cold, warm)
    return stats


def _release_cached_memory(device: str) -> None:
    """Give the blocks torch's allocator keeps back to the GPU, for the smaller batches to come."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of memory: a GPU's ``OutOfMemoryError``, or the CPU
    allocator's RuntimeError, which has no type of its own."""
    import torch

    # torch.compile hands on one raised while it compiled a shape wrapped, as the cause of its own.
    for error in (exc, getattr(exc, "inner_exception", None), exc.__cause__):
        if isinstance(error, torch.OutOfMemoryError) or (error is not None and "can't allocate memory" in str(error)):
            return True
    return False


def out_of_memory_message(loaded: LoadedPipeline, settings: GenerationSettings, mid_run: bool = True) -> str:
    """What to change when one image did not fit in ``loaded``'s device's memory (on a CPU one
    image a pipeline call, whatever the batch size; on a GPU, after batches halved down to one,
    or in ``auto``'s probe, before the run made any: not ``mid_run``)."""
    size = f"{settings.width}x{settings.height}"
    where = "the CPU" if loaded.device == "cpu" else loaded.device
    other_work = "" if loaded.device == "cpu" else ", or free the GPU of other work"
    kept = " (the images made before it are kept)" if mid_run else ""
    return (
        f"out of memory on {where} rendering one {size} image; make inference.width and height smaller{other_work}"
        + kept
    )


def rows_to_render(
    loaded: LoadedPipeline, batch: Sequence[PromptRow], batch_size: int, settings: GenerationSettings
) -> list[PromptRow]:
    """The rows to render for ``batch``: with a compiled UNet on a GPU, a short last batch is
    filled up to the full batch size once that shape is compiled, repeating its last row (the
    copies are thrown away). Compiling a new shape took 70-100 s on an H100, while a whole batch
    of 32 takes about 9 s (docs/PERFORMANCE.md). On a CPU rows render one at a time, so every
    batch already has the same shape.
    """
    full_shape = (batch_size, settings.width, settings.height)
    short = 0 < len(batch) < batch_size
    if short and loaded.compiled and loaded.device != "cpu" and full_shape in loaded.warmed_shapes:
        return [*batch, *[batch[-1]] * (batch_size - len(batch))]
    return list(batch)


AUTO_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def _probe_peaks(loaded: LoadedPipeline, settings: GenerationSettings) -> list[int]:
    """The peak bytes of one step of a batch of one image, then of two, beyond what was already
    allocated; only those that fit (none, when one image does not)."""
    import torch

    probe = dataclasses.replace(settings, steps=1)
    row = PromptRow("probe", "probe", 0, "probe", "", 0, "probe")
    peaks = []
    for count in (1, 2):
        torch.cuda.synchronize(loaded.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(loaded.device)
        base = torch.cuda.memory_allocated(loaded.device)
        try:
            with uncompiled(loaded.pipeline):  # a compiled probe would compile two shapes nobody uses
                render_batch(loaded, [row] * count, probe)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            break
        peaks.append(torch.cuda.max_memory_allocated(loaded.device) - base)
    # Out of the except block, where a failed probe's tensors are freed: what the probes left in
    # torch's cache goes back to the GPU, or the free memory measured next would not count it.
    _release_cached_memory(loaded.device)
    return peaks


def batch_size_for_memory(peak_one: int, peak_two: int, free: int) -> int:
    """The largest of ``AUTO_BATCH_CANDIDATES`` whose memory fits in 85% of ``free`` bytes.

    ``peak_one`` and ``peak_two`` are the bytes a batch of one and of two images took at their
    peak: their difference is one image's share, the rest is what any batch needs. 1 when even
    that does not fit (the run then finds out for itself).
    """
    per_image = max(peak_two - peak_one, 1)
    fixed = max(peak_one - per_image, 0)
    budget = free * 0.85 - fixed
    return max([c for c in AUTO_BATCH_CANDIDATES if c * per_image <= budget] or [1])


def auto_batch_key(loaded: LoadedPipeline, settings: GenerationSettings) -> str:
    """What an ``auto`` batch size is remembered under: whatever changes a batch's peak memory.

    The model revision (its folder), device, dtype and image size; and, only when on, the safety
    checker (a CLIP vision pass over every batch) and DeepCache's branch (the features it keeps), and
    only when off, classifier-free guidance (a guidance scale of 1 or less: one UNet pass an image
    rather than two, about half the memory), so the keys remembered before those joined stay as they were.
    Not compile: the probe runs the UNet uncompiled either way.
    """
    key = f"{loaded.folder.name}|{loaded.device}|{loaded.dtype}|{settings.width}x{settings.height}"
    if settings.guidance_scale <= 1:
        key += "|no-guidance"
    if settings.safety_checker:
        key += "|safety-checker"
    if settings.deep_cache:
        key += f"|deep-cache-branch-{settings.deep_cache.branch}"
    return key


def _remembered_sizes(memory_file: Path) -> dict[str, int]:
    """``auto``'s answers kept in ``memory_file``: each a batch size of 1 or more. None when the
    file is missing, unreadable or not a JSON object, and none of an entry that is not such a
    size (a hand edit, a file of something else): that answer is measured again."""
    try:
        remembered = json.loads(memory_file.read_bytes())
    except (OSError, ValueError):  # missing, not ours to read, not JSON (UnicodeDecodeError is one)
        return {}
    if not isinstance(remembered, dict):
        return {}
    return {key: size for key, size in remembered.items() if type(size) is int and size >= 1}


def remember_auto_batch_size(
    loaded: LoadedPipeline, settings: GenerationSettings, memory_file: Path, size: int
) -> None:
    """Keep ``size`` as ``auto``'s answer for this model, device and settings in ``memory_file``
    (measured, or what a run that ran out of memory went on at)."""
    # The runs of the node's other GPUs read and write it too: one at a time, or two finishing
    # together would each write what it read, and one answer would be lost (measured again).
    with hold_lock(memory_file.parent, f".{memory_file.name}.lock"):
        remembered = _remembered_sizes(memory_file)
        remembered[auto_batch_key(loaded, settings)] = size
        # Whole or not at all: a reader sees the old answers or the new ones.
        atomic_write(memory_file, json.dumps(remembered, indent=1, sort_keys=True).encode("utf-8"))


def remember_after_running_out_of_memory(
    loaded: LoadedPipeline, settings: GenerationSettings, memory_file: Path, failed_rows: int, went_on_at: int
) -> bool:
    """After a style ran out of memory at a batch of ``failed_rows`` images and went on at
    ``went_on_at``, keep that as ``auto``'s answer if the batch that did not fit was as large as
    the answer remembered (which was too large); not if it was smaller (a style's few images, a
    short last batch: the GPU was short of memory for other work, for the while). Whether it kept it."""
    remembered = _remembered_sizes(memory_file).get(auto_batch_key(loaded, settings))
    if remembered is None or failed_rows < remembered:
        return False
    remember_auto_batch_size(loaded, settings, memory_file, went_on_at)
    return True


def auto_batch_size(
    loaded: LoadedPipeline, settings: GenerationSettings, memory_file: Path | None = None, pending: int = 0
) -> int:
    """The batch size to use when the grid says ``auto``; remembered under ``auto_batch_key``.

    CPU: 1 (batching does not speed up a 2-core CPU; it only delays the first image). GPU: the
    largest candidate whose estimated peak memory fits in 85% of the free memory, estimated
    from the peak of one batch-1 and one batch-2 step, capped by ``pending`` images when given
    (for a compiled UNet, at the smallest shape it has compiled that holds them); 1 when two
    images do not fit, which is not remembered.

    Raises:
        SdAssetsError: one image does not fit in the GPU's memory, with the settings to lower.
    """
    if loaded.device == "cpu":
        return 1
    import torch

    remembered_key = auto_batch_key(loaded, settings)
    remembered = _remembered_sizes(memory_file) if memory_file is not None else {}
    if remembered_key in remembered:
        size = remembered[remembered_key]
    else:
        peaks = _probe_peaks(loaded, settings)
        if not peaks:
            raise SdAssetsError(out_of_memory_message(loaded, settings, mid_run=False))
        if len(peaks) == 1:  # one image fits, two do not: the GPU is shared, or nearly full, for now
            size = 1  # not remembered: the next run asks again
        else:
            free, _total = torch.cuda.mem_get_info(loaded.device)
            size = batch_size_for_memory(peaks[0], peaks[1], free)
            if memory_file is not None:
                remember_auto_batch_size(loaded, settings, memory_file, size)
    if pending:
        capped = min(size, max(1, pending))
        # A compiled UNet renders a few images padded to a shape it has compiled (seconds)
        # rather than compile one of their own (a minute or more on a GPU).
        compiled_sizes = [
            batch for batch, width, height in (loaded.warmed_shapes if loaded.compiled else ())
            if (width, height) == (settings.width, settings.height) and capped <= batch <= size
        ]  # fmt: skip
        size = min(compiled_sizes, default=capped)
    return size

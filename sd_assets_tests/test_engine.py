"""The generation engine: same pixels whatever the batching, sensible CPU defaults, a bounded writer."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import re
import shutil
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from sd_assets.domain import catalog, engine
from sd_assets.domain.deep_cache import DeepCache, installed, unet_forward
from sd_assets.domain.errors import SdAssetsError, StoreError
from sd_assets.domain.gallery import settings_text
from sd_assets.domain.generation import make_style_images
from sd_assets.domain.models import ModelRef
from sd_assets.domain.pngmeta import image_key_path, read_provenance
from sd_assets.domain.prompts import GenerationSettings, PromptRow, content_key, image_seed
from sd_assets.domain.store import LocalStore

SETTINGS = GenerationSettings(
    model_id="tiny-random",
    model_revision="rev",
    scheduler="PNDMScheduler",
    steps=2,
    guidance_scale=7.5,
    width=64,
    height=64,
    negative_prompt="",
)
ROWS = [
    PromptRow(subject, "Banksy", index, f"{subject} by Banksy", "", image_seed(42, subject, index), f"{subject}-{index}")
    for subject in ("alan turing", "ada lovelace", "grace hopper")
    for index in range(2)
]


@pytest.fixture(scope="module")
def loaded(tiny_model_store) -> engine.LoadedPipeline:
    folder = next((tiny_model_store.root / "models" / "tiny-random").glob("*/model_index.json")).parent
    return engine.load_pipeline(folder, "cpu", "float32")


def render_all(loaded: engine.LoadedPipeline, rows: list[PromptRow], batch_size: int) -> dict[str, np.ndarray]:
    images: dict[str, np.ndarray] = {}
    with engine.BoundedWriter(workers=2, max_pending=8) as writer:
        engine.generate(loaded, rows, SETTINGS, batch_size, lambda row, pixels, _flagged: images.update({row.key: pixels}),
                        writer)  # fmt: skip
    return images


def test_an_images_pixels_do_not_depend_on_its_batch(loaded):
    one_by_one = render_all(loaded, ROWS, batch_size=1)
    in_fours = render_all(loaded, ROWS, batch_size=4)  # a batch of 4, then one of 2
    # The same images in other company and order: 3 + 3, shuffled.
    shuffled = render_all(loaded, [ROWS[5], ROWS[0], ROWS[3], ROWS[2], ROWS[4], ROWS[1]], batch_size=3)

    assert set(one_by_one) == {row.key for row in ROWS}
    for key, pixels in one_by_one.items():
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        assert np.array_equal(pixels, in_fours[key]) and np.array_equal(pixels, shuffled[key]), key
    # Different seeds and prompts still give different images.
    assert not np.array_equal(one_by_one[ROWS[0].key], one_by_one[ROWS[1].key])


def test_an_images_starting_noise_is_drawn_on_the_cpu_whatever_the_device(loaded):
    # The same pipeline recorded as on a GPU: its generators must still be the CPU's, whose numbers
    # for a seed are the same everywhere (a CUDA generator draws others, and this torch has none).
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    as_on_gpu = engine.run_pipeline(on_gpu, ROWS[:1], SETTINGS).images
    assert torch.equal(as_on_gpu, engine.run_pipeline(loaded, ROWS[:1], SETTINGS).images)


def _as_on_a_compiled_gpu(loaded: engine.LoadedPipeline, warmed: set) -> engine.LoadedPipeline:
    """The CPU pipeline recorded as compiled on a GPU: its batches go through in one call, as there."""
    return engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", True, warmed)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same picture: a batched call sums in another order, which moves a level or two at most."""
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= 2


def test_every_image_of_one_pipeline_call_starts_from_its_own_seed(loaded):
    # On a CPU the rows go through one at a time; on a GPU a whole batch is one call, and each of
    # its images must still be the picture of its own seed, not of the first row's.
    alone = render_all(loaded, ROWS[:3], batch_size=1)
    together = engine.run_pipeline(loaded, ROWS[:3], SETTINGS).images
    pixels = together.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for row, image in zip(ROWS[:3], pixels, strict=True):
        assert _close(image, alone[row.key]), row.key
    assert not _close(pixels[0], pixels[1]) and not _close(pixels[0], pixels[2])


def test_a_short_last_batch_filled_to_the_compiled_shape_gives_each_row_its_own_image(loaded):
    # 6 rows in batches of 4 on a "GPU" whose 4-image shape is compiled: the last batch of 2 is
    # filled with 2 copies of its last row, which are thrown away; rows 4 and 5 get their own pictures.
    alone = render_all(loaded, ROWS, batch_size=1)
    images: dict[str, np.ndarray] = {}
    with engine.BoundedWriter(workers=2, max_pending=8) as writer:
        stats = engine.generate(_as_on_a_compiled_gpu(loaded, {(4, 64, 64)}), ROWS, SETTINGS, 4,
                                lambda row, pixels, _flagged: images.update({row.key: pixels}), writer)  # fmt: skip
    assert (stats.generated, stats.padded) == (6, 2)
    assert set(images) == set(alone)
    for key, pixels in images.items():
        assert _close(pixels, alone[key]), key


def test_the_negative_prompt_reaches_the_pipeline_only_with_guidance(loaded):
    blurry = [dataclasses.replace(ROWS[0], negative_prompt="blurry")]
    guided = dataclasses.replace(SETTINGS, negative_prompt="blurry")
    assert not np.array_equal(engine.render_batch(loaded, blurry, guided), engine.render_batch(loaded, ROWS[:1], SETTINGS))
    # At guidance 1 there is no unconditional pass for it to steer: the same pixels as without it.
    unguided = dataclasses.replace(guided, guidance_scale=1.0)
    assert np.array_equal(
        engine.render_batch(loaded, blurry, unguided),
        engine.render_batch(loaded, ROWS[:1], dataclasses.replace(SETTINGS, guidance_scale=1.0)),
    )


def test_a_remembered_auto_batch_size_is_used_without_a_probe_and_capped_by_the_images_to_make(loaded, tmp_path):
    on_gpu = engine.LoadedPipeline(None, loaded.folder, "cuda", "float16", "PNDMScheduler", False)
    memory_file = tmp_path / "auto-batch-sizes.json"
    memory_file.write_text(json.dumps({engine.auto_batch_key(on_gpu, SETTINGS): 16}))
    # No pipeline to probe with (None): a probe would fail, so these sizes come from the file.
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 16
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file, pending=48) == 16
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file, pending=3) == 3
    # A run that ran out of memory at 16 and went on at 8 leaves 8 for the next, beside the other answers.
    other = dataclasses.replace(SETTINGS, width=128)
    engine.remember_auto_batch_size(on_gpu, other, memory_file, 4)
    engine.remember_auto_batch_size(on_gpu, SETTINGS, memory_file, 8)
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 8
    assert engine.auto_batch_size(on_gpu, other, memory_file) == 4


def test_answers_remembered_together_by_the_runs_of_several_gpus_are_all_kept(loaded, tmp_path, monkeypatch):
    on_gpu = engine.LoadedPipeline(None, loaded.folder, "cuda", "float16", "PNDMScheduler", False)
    memory_file = tmp_path / "cache" / "auto-batch-sizes.json"
    write = engine.atomic_write

    def slow_write(path, data):  # each run between its read and its write while the others read
        time.sleep(0.2)
        write(path, data)

    monkeypatch.setattr(engine, "atomic_write", slow_write)
    sizes = [dataclasses.replace(SETTINGS, width=64 * (n + 1)) for n in range(4)]
    runs = [threading.Thread(target=engine.remember_auto_batch_size, args=(on_gpu, s, memory_file, 8)) for s in sizes]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert json.loads(memory_file.read_text()) == {engine.auto_batch_key(on_gpu, s): 8 for s in sizes}


def test_a_short_last_batch_is_filled_to_the_compiled_shape_only_on_a_gpu(loaded):
    def on(device: str, compiled: bool, warmed: set) -> engine.LoadedPipeline:
        return engine.LoadedPipeline(None, loaded.folder, device, "float16", "PNDMScheduler", compiled, warmed)

    last = ROWS[4:]  # 2 rows left of a batch size of 4
    compiled_gpu = on("cuda", True, {(4, 64, 64)})
    assert engine.rows_to_render(compiled_gpu, last, 4, SETTINGS) == [ROWS[4], ROWS[5], ROWS[5], ROWS[5]]
    assert engine.rows_to_render(compiled_gpu, ROWS[:4], 4, SETTINGS) == ROWS[:4]
    # Not yet compiled at the full size (a style with fewer images than a batch): no filling.
    assert engine.rows_to_render(on("cuda", True, {(2, 64, 64)}), last, 4, SETTINGS) == last
    # Eager on a GPU, or anything on a CPU (rows render one at a time there): no filling.
    assert engine.rows_to_render(on("cuda", False, {(4, 64, 64)}), last, 4, SETTINGS) == last
    assert engine.rows_to_render(on("cpu", True, {(4, 64, 64)}), last, 4, SETTINGS) == last


def test_auto_batch_size_on_cpu_is_one_and_remembers_nothing(loaded, tmp_path):
    memory_file = tmp_path / "auto-batch-sizes.json"
    assert engine.auto_batch_size(loaded, SETTINGS, memory_file, pending=48) == 1
    assert not memory_file.exists()


@pytest.fixture
def gpu_memory_calls(monkeypatch) -> dict:
    """torch.cuda's memory calls, which a CPU build of torch cannot make, answered as a GPU with
    80 GiB free whose allocator saw 3 GiB at the peak of a batch of one, 4 GiB at a batch of two."""
    gib = 2**30
    peaks = {"probes": 0}

    def reset_peak(_device=None):
        peaks["probes"] += 1

    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *_args: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda _device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda _device=None: (2 + peaks["probes"]) * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (80 * gib, 80 * gib))
    return peaks


def test_auto_batch_size_on_a_gpu_probes_one_and_two_images(loaded, tmp_path, gpu_memory_calls):
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    memory_file = tmp_path / "auto-batch-sizes.json"
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 64
    assert json.loads(memory_file.read_text()) == {engine.auto_batch_key(on_gpu, SETTINGS): 64}


@pytest.mark.parametrize(
    "damaged", ["[16]", '{"KEY": "auto"}', '{"KEY": 0}', '{"KEY": true}', '{"KEY": 16.5}', "not json", "\udcff"]
)
def test_a_damaged_auto_batch_size_file_is_measured_again_and_rewritten(loaded, tmp_path, gpu_memory_calls, damaged):
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    key = engine.auto_batch_key(on_gpu, SETTINGS)
    memory_file = tmp_path / "auto-batch-sizes.json"
    memory_file.write_bytes(damaged.replace("KEY", key).encode("utf-8", "surrogateescape"))
    # A run that ran out of memory finds no answer to correct: nothing to remember, nothing raised.
    assert engine.remember_after_running_out_of_memory(on_gpu, SETTINGS, memory_file, 16, 8) is False
    assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 64
    assert json.loads(memory_file.read_text()) == {key: 64}


@pytest.mark.parametrize("images_that_fit", [1, 0])
def test_auto_batch_size_when_the_probe_runs_out_of_gpu_memory(
    loaded, tmp_path, gpu_memory_calls, monkeypatch, images_that_fit
):
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    forward = loaded.pipeline.unet.forward

    def fits(sample, *args, **kwargs):  # with guidance, one image is a UNet batch of 2
        if sample.shape[0] > 2 * images_that_fit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", fits)
    memory_file = tmp_path / "auto-batch-sizes.json"
    if images_that_fit:  # a GPU shared with other work, for now: one image a batch, and the next run asks again
        assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 1
        assert not memory_file.exists()
        monkeypatch.setattr(loaded.pipeline.unet, "forward", forward)  # the other work is done
        assert engine.auto_batch_size(on_gpu, SETTINGS, memory_file) == 64
        assert json.loads(memory_file.read_text()) == {engine.auto_batch_key(on_gpu, SETTINGS): 64}
        return
    with pytest.raises(SdAssetsError) as failed:
        engine.auto_batch_size(on_gpu, SETTINGS, memory_file)
    # The probe runs before the style's first image: no image of the run was made to be kept.
    assert str(failed.value) == (
        "out of memory on cuda rendering one 64x64 image; make inference.width and height smaller, or free the GPU "
        "of other work"
    )
    assert not memory_file.exists()


def test_auto_batch_size_is_the_largest_batch_that_fits_in_85_percent_of_free_memory():
    gib = 2**30
    # A batch of one took 3 GiB at its peak, a batch of two 4 GiB: 1 GiB an image, 2 GiB for any batch.
    assert engine.batch_size_for_memory(3 * gib, 4 * gib, 80 * gib) == 64  # 66 GiB for images: 64 is the largest
    assert engine.batch_size_for_memory(3 * gib, 4 * gib, 10 * gib) == 4  # 6.5 GiB: 4 fit, 8 do not
    # 16 images need 18 GiB free at 85%: 21.18 GiB.
    assert engine.batch_size_for_memory(3 * gib, 4 * gib, 21 * gib) == 8
    assert engine.batch_size_for_memory(3 * gib, 4 * gib, int(21.5 * gib)) == 16
    assert engine.batch_size_for_memory(3 * gib, 4 * gib, 2 * gib) == 1  # not even one: 1, and the run finds out
    assert engine.batch_size_for_memory(11 * gib, 12 * gib, 80 * gib) == 32  # 10 GiB fixed: 58 GiB for images


def test_auto_batch_size_counts_the_memory_its_probes_left_cached_as_free(loaded, tmp_path, gpu_memory_calls,
                                                                          monkeypatch):
    """torch keeps a probe's blocks cached, and the driver does not count them free: a GPU with 24 GiB
    free whose probes keep 4 GiB cached has room for 16 images (1 GiB each, 2 GiB for any batch)."""
    gib = 2**30
    cached = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.update(bytes=0))
    probe_starts = torch.cuda.reset_peak_memory_stats

    def probe_caches_4_gib(device=None):  # the probe that follows leaves 4 GiB in torch's cache
        probe_starts(device)
        cached.update(bytes=4 * gib)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", probe_caches_4_gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (24 * gib - cached["bytes"], 80 * gib))
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)

    assert engine.auto_batch_size(on_gpu, SETTINGS, tmp_path / "auto-batch-sizes.json") == 16


def test_auto_batch_size_for_a_compiled_unet_pads_a_few_images_to_a_compiled_shape(loaded, tmp_path):
    """Five images left at a remembered 32: a compiled UNet renders them padded to a shape it has
    compiled (seconds), not at a shape of five it would compile first (a minute or more on a GPU)."""
    memory_file = tmp_path / "auto-batch-sizes.json"

    def on_gpu(compiled: bool, warmed: set) -> engine.LoadedPipeline:
        return engine.LoadedPipeline(None, loaded.folder, "cuda", "float16", "PNDMScheduler", compiled, warmed)

    memory_file.write_text(json.dumps({engine.auto_batch_key(on_gpu(True, set()), SETTINGS): 32}))
    assert engine.auto_batch_size(on_gpu(True, {(32, 64, 64)}), SETTINGS, memory_file, pending=5) == 32
    # The smallest compiled shape that holds them, of the image size asked for.
    warmed = {(32, 64, 64), (8, 64, 64), (4, 64, 64), (16, 96, 96)}
    assert engine.auto_batch_size(on_gpu(True, warmed), SETTINGS, memory_file, pending=5) == 8
    assert engine.auto_batch_size(on_gpu(True, warmed), SETTINGS, memory_file, pending=4) == 4
    # Nothing compiled yet, or eager: as many as there are images.
    assert engine.auto_batch_size(on_gpu(True, set()), SETTINGS, memory_file, pending=5) == 5
    assert engine.auto_batch_size(on_gpu(False, {(32, 64, 64)}), SETTINGS, memory_file, pending=5) == 5


def test_auto_batch_size_is_remembered_apart_for_settings_that_change_its_memory(loaded):
    plain = engine.auto_batch_key(loaded, SETTINGS)
    # Sizes remembered before the safety checker and DeepCache counted keep their keys.
    assert plain == f"{loaded.folder.name}|cpu|float32|64x64"
    keys = {
        plain,
        engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, width=96)),
        engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, safety_checker=True)),
        engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, deep_cache=DeepCache(3, 0))),
        engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, deep_cache=DeepCache(3, 1))),
        # Without classifier-free guidance the UNet takes one pass an image, not two.
        engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, guidance_scale=1.0)),
    }
    assert len(keys) == 6
    assert engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, guidance_scale=0.5)) in keys
    # The interval keeps the same features; it does not change the memory.
    assert engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, deep_cache=DeepCache(2, 1))) in keys
    assert engine.auto_batch_key(loaded, dataclasses.replace(SETTINGS, steps=9, guidance_scale=3.0)) == plain


def test_pipeline_is_loaded_for_speed(loaded):
    pipeline = loaded.pipeline
    # diffusers uses torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs).
    assert {type(p).__name__ for p in pipeline.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert pipeline.safety_checker is None
    assert pipeline.unet.dtype == torch.float32 and loaded.dtype == "float32"
    assert engine.load_pipeline(loaded.folder, "cpu", "float32") is loaded


def test_fused_qkv_tuning_fuses_every_attention_layer_and_keeps_the_picture(loaded):
    fused = engine.load_pipeline(loaded.folder, "cpu", "float32", tuning=engine.Tuning(fuse_qkv=True))

    assert fused is not loaded and fused.tuning.fuse_qkv
    assert {type(p).__name__ for p in fused.pipeline.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    plain = render_all(loaded, ROWS[:2], batch_size=1)
    tuned = render_all(fused, ROWS[:2], batch_size=1)
    for key, pixels in plain.items():
        # One matmul instead of three sums in another order: at most a level or two moves.
        difference = np.abs(pixels.astype(int) - tuned[key].astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.05, key


def test_compile_vae_compiles_the_decoder_along_with_the_unet(loaded):
    # Wrapping only: nothing is rendered, so nothing compiles here (that takes minutes on a CPU).
    unet_only = engine.load_pipeline(loaded.folder, "cpu", "float32", compile_unet=True)
    both = engine.load_pipeline(loaded.folder, "cpu", "float32", compile_unet=True,
                                tuning=engine.Tuning(compile_vae=True))  # fmt: skip

    compiled = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(unet_only.pipeline.unet, compiled) and isinstance(both.pipeline.unet, compiled)
    assert not isinstance(unet_only.pipeline.vae.decoder, compiled)
    assert isinstance(both.pipeline.vae.decoder, compiled)
    assert not isinstance(loaded.pipeline.unet, compiled)


@pytest.mark.parametrize("deep_cache", [None, DeepCache(interval=2, branch=0)])
def test_the_batch_size_probe_runs_a_compiled_pipeline_eagerly_and_compiles_nothing(loaded, deep_cache):
    compiled = engine.load_pipeline(loaded.folder, "cpu", "float32", compile_unet=True,
                                    tuning=engine.Tuning(compile_vae=True), deep_cache=deep_cache)  # fmt: skip
    pipeline = compiled.pipeline
    unet, decoder = pipeline.unet, pipeline.vae.decoder
    graphs = dict(torch._dynamo.utils.counters["stats"])
    with engine.uncompiled(pipeline):
        assert not isinstance(pipeline.unet, torch._dynamo.eval_frame.OptimizedModule)
        assert not isinstance(pipeline.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
        pixels = engine.render_batch(compiled, ROWS[:1], dataclasses.replace(SETTINGS, steps=1, deep_cache=deep_cache))
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs, "nothing was compiled"
    assert pixels.shape == (1, 64, 64, 3)
    assert (pipeline.unet, pipeline.vae.decoder) == (unet, decoder), "the compiled parts are back"
    if deep_cache is not None:
        assert installed(pipeline.unet)._forward is not unet_forward, "DeepCache's compiled paths are back"


def test_an_unknown_scheduler_is_named_with_the_close_ones_before_any_weights_load(loaded):
    with pytest.raises(SdAssetsError, match=r"'EulerDiscreetScheduler' is not a diffusers scheduler class; did you mean "
                       r"EulerDiscreteScheduler"):  # fmt: skip
        engine.load_pipeline(loaded.folder / "no-weights-here", "cpu", "float32", scheduler="EulerDiscreetScheduler")
    for typed, message in [
        ("Eul", r"'Eul' is not a diffusers scheduler class; did you mean EulerAncestralDiscreteScheduler or "
                  r"EulerDiscreteScheduler\?$"),
        # Nothing like it: not three names that share only "Scheduler" with it, but the usual ones.
        ("FooScheduler", r"'FooScheduler' is not a diffusers scheduler class; Stable Diffusion's usual ones are "
                         r"PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler$"),
        ("Euler a", r"'Euler a' is the web UI's name; diffusers' class is EulerAncestralDiscreteScheduler$"),
        ("euler_a", r"'euler_a' is the web UI's name; diffusers' class is EulerAncestralDiscreteScheduler$"),
    ]:  # fmt: skip
        with pytest.raises(SdAssetsError, match=message):
            engine.scheduler_class(typed)
    # diffusers names it, but without torchsde it is a placeholder.
    with pytest.raises(SdAssetsError, match=r"'DPMSolverSDEScheduler' needs torchsde: pip install torchsde"):
        engine.load_pipeline(loaded.folder, "cpu", "float32", scheduler="DPMSolverSDEScheduler")


def test_a_scheduler_made_for_other_pipelines_is_named_before_any_weights_load(loaded):
    with pytest.raises(SdAssetsError) as refused:
        engine.load_pipeline(loaded.folder / "no-weights-here", "cpu", "float32",
                             scheduler="FlowMatchEulerDiscreteScheduler")  # fmt: skip
    assert str(refused.value) == (
        "inference.scheduler 'FlowMatchEulerDiscreteScheduler' is made for other diffusers pipelines than Stable "
        "Diffusion's (it has no scale_model_input); Stable Diffusion's usual ones are PNDMScheduler, DDIMScheduler, "
        "EulerDiscreteScheduler and DPMSolverMultistepScheduler"
    )
    for other in ("DDPMWuerstchenScheduler", "ScoreSdeVeScheduler"):
        with pytest.raises(SdAssetsError, match=f"'{other}' is made for other diffusers pipelines"):
            engine.scheduler_class(other)
    # Not one of the pipeline's own, but it runs there (with an LCM model or LoRA).
    assert engine.scheduler_class("LCMScheduler").__name__ == "LCMScheduler"


def test_compile_time_is_what_new_shapes_took_beyond_the_warm_rate():
    # 2 warm batches: 4 images in 2 s, so 0.5 s an image. A cold batch of 2 images took 6 s: 5 s compiling.
    assert engine.compile_seconds([(2, 6.0)], [(2, 1.0), (2, 1.0)]) == 5.0
    # A cold batch no slower than warm ones (a compile cache hit on a busy machine) counts nothing.
    assert engine.compile_seconds([(2, 0.9)], [(2, 1.0)]) == 0.0
    # Nothing warm to compare with (every batch a new shape): all of it.
    assert engine.compile_seconds([(2, 6.0), (1, 4.0)], []) == 10.0
    assert engine.compile_seconds([], [(2, 1.0)]) == 0.0


def test_an_unknown_compile_mode_is_a_clear_error():
    with pytest.raises(SdAssetsError, match="compile mode 'reduce-overhead' is not one of default, max-autotune"):
        engine.Tuning(compile_mode="reduce-overhead")
    with pytest.raises(SdAssetsError, match="compile mode 'fast' is not one of"):
        engine.compiled_unet(torch.nn.Identity(), "fast")


def test_inductor_tuning_switches_its_three_settings_and_back():
    import torch._inductor.config as inductor

    try:
        engine.set_inductor_tuning(True)
        assert (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning, inductor.epilogue_fusion) == (True, True, False)
    finally:
        engine.set_inductor_tuning(False)
    assert (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning, inductor.epilogue_fusion) == (False, False, True)


def test_cudnn_attention_tuning_puts_cudnn_first_only_while_rendering_on_a_gpu(loaded):
    from torch.nn.attention import SDPBackend

    def order() -> list:
        return list(torch._C._get_sdp_priority_order())

    usual = order()
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float16", "PNDMScheduler", False,
                                   tuning=engine.Tuning(cudnn_attention=True))  # fmt: skip
    with engine.attention_backend(on_gpu):
        assert order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert order() == usual
    with engine.attention_backend(loaded):  # a CPU pipeline: nothing changes
        assert order() == usual


def test_dtype_defaults_to_half_on_gpus_and_full_on_cpu():
    assert engine.pick_dtype("cuda", "auto") == "float16"
    assert engine.pick_dtype("cuda:1", "bfloat16") == "bfloat16"
    assert engine.pick_dtype("cpu", "auto") == "float32"
    assert engine.pick_device("cpu") == "cpu"


def test_a_misspelt_device_is_a_clear_error():
    with pytest.raises(SdAssetsError, match="device 'gpu' is not one of 'auto', 'cpu', 'cuda'"):
        engine.pick_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error():
    with pytest.raises(SdAssetsError, match="no CUDA GPU is visible"):
        engine.pick_device("cuda")
    assert engine.pick_device("auto") == "cpu"


def test_asking_for_a_gpu_index_past_the_visible_ones_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert engine.pick_device("cuda:1") == "cuda:1" and engine.pick_device("cuda") == "cuda"
    with pytest.raises(SdAssetsError) as failed:
        engine.pick_device("cuda:2")
    assert str(failed.value) == (
        "device 'cuda:2' asked for, but this process sees 2 CUDA GPUs, cuda:0 to cuda:1 (numbered from 0 among "
        "those CUDA_VISIBLE_DEVICES shows)"
    )


def test_writer_blocks_submit_once_max_pending_tasks_wait():
    gate = threading.Event()
    done: list[int] = []
    submitted: list[int] = []
    writer = engine.BoundedWriter(workers=2, max_pending=3)

    def task(number: int) -> None:
        gate.wait()
        done.append(number)

    def submit_all() -> None:
        for number in range(12):
            writer.submit(task, number)
            submitted.append(number)

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    try:
        deadline = time.monotonic() + 5
        while len(submitted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # Two tasks run, one waits in the queue, and the fourth submit is blocked.
        assert submitted == [0, 1, 2] and submitter.is_alive()
    finally:
        gate.set()  # a failed check must not leave the tasks, and pytest, waiting for ever
    submitter.join(5)
    writer.close()
    assert sorted(done) == list(range(12))
    assert writer.peak_pending == writer.max_pending == 3


def test_writer_never_holds_more_than_max_pending_slow_tasks():
    writer = engine.BoundedWriter(workers=2, max_pending=4)
    with writer:
        for _ in range(20):
            writer.submit(time.sleep, 0.005)
    assert writer.peak_pending <= writer.max_pending


def test_a_failed_write_surfaces_from_the_writer():
    def fail() -> None:
        raise OSError("disk full")

    writer = engine.BoundedWriter(workers=1, max_pending=2)
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()

    writer = engine.BoundedWriter(workers=1, max_pending=2)
    writer.submit(fail)
    time.sleep(0.1)
    with pytest.raises(OSError, match="disk full"):
        writer.raise_first_error()
    writer.submit(time.sleep, 0)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_generation_stops_at_the_first_batch_after_a_failed_write(loaded):
    calls: list[str] = []

    def fail(row: PromptRow, _pixels, _flagged) -> None:
        calls.append(row.key)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with engine.BoundedWriter(workers=1, max_pending=1) as writer:
            engine.generate(loaded, ROWS, SETTINGS, 2, fail, writer)
    assert len(calls) < len(ROWS)


def test_images_written_before_a_failed_write_keep_their_pending_records(loaded, tmp_path):
    # The next run finds their rows in the pending batches, not by reading every PNG back.
    class FullAfterThreeImages(LocalStore):
        def write_bytes(self, key: str, data: bytes) -> None:
            if key.startswith("images/") and len(list(self.list_keys("images/"))) >= 3:
                raise StoreError("disk full")
            super().write_bytes(key, data)

    store = FullAfterThreeImages(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    with pytest.raises(StoreError, match="disk full"):
        make_style_images(store, loaded, ref, SETTINGS, ROWS, style="Banksy", partition="Banksy", run_id="r1",
                          batch_size=1, writer_threads=1, max_pending=1)  # fmt: skip
    written = sorted(key.rsplit("/", 1)[-1].removesuffix(".png") for key in store.list_keys("images/"))
    assert len(written) == 3
    pending = store.list_keys(catalog.pending_prefix("Banksy"))
    batches = [store.read_text(key) for key in pending if key.endswith(".jsonl")]
    assert sorted(json.loads(line)["key"] for batch in batches for line in batch.splitlines()) == written


def test_an_error_that_stops_generation_is_raised_over_a_write_that_failed_meanwhile(loaded, tmp_path, monkeypatch):
    # The write of the first image fails after the second batch has stopped generation with an
    # error of its own: that error says what to do; the write's is said beside it.
    class SlowFullDisk(LocalStore):
        def write_bytes(self, key: str, data: bytes) -> None:
            if key.startswith("images/"):
                time.sleep(0.5)
                raise StoreError("disk full")
            super().write_bytes(key, data)

    render = engine.render_checked
    batches: list[int] = []

    def second_batch_fails(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return render(*args, **kwargs)

    monkeypatch.setattr(engine, "render_checked", second_batch_fails)
    said: list[str] = []
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    with pytest.raises(RuntimeError, match="an illegal memory access"):
        make_style_images(SlowFullDisk(tmp_path), loaded, ref, SETTINGS, ROWS[:2], style="Banksy", partition="Banksy",
                          run_id="r1", batch_size=1, writer_threads=1, max_pending=2, log=said.append)  # fmt: skip
    assert "Banksy: a PNG could not be written either: disk full" in said


def _with_safety_checker(folder, destination, flag_everything: bool):
    """A copy of the tiny model with a tiny random safety checker that flags every image, or none."""
    import shutil

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(folder, destination)
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": 32, "patch_size": 4}  # fmt: skip
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=32))
    # A concept's score is cosine similarity less its weight; above 0 flags the image.
    checker.concept_embeds_weights.data.fill_(-1.0 if flag_everything else 2.0)
    checker.special_care_embeds_weights.data.fill_(2.0)
    checker.save_pretrained(destination / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        destination / "feature_extractor"
    )
    index = json.loads((destination / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)  # fmt: skip
    (destination / "model_index.json").write_text(json.dumps(index))
    return destination


def test_images_the_safety_checker_flags_are_kept_blacked_out_and_marked(loaded, tmp_path, monkeypatch):
    from sd_assets.domain import generation

    # Flagged images are counted across the record flushes (3 images: batches of 2 and 1).
    monkeypatch.setattr(generation, "RECORD_FLUSH_EVERY", 2)
    settings = dataclasses.replace(SETTINGS, safety_checker=True)
    rows = [dataclasses.replace(row, key=content_key(settings, row.prompt, row.seed)) for row in ROWS[:3]]
    assert rows[0].key != content_key(SETTINGS, rows[0].prompt, rows[0].seed), "checked images are other pictures"
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    for flag_everything in (True, False):
        folder = _with_safety_checker(loaded.folder, tmp_path / f"model-{flag_everything}", flag_everything)
        checked = engine.load_pipeline(folder, "cpu", "float32", safety_checker=True)
        store = LocalStore(tmp_path / f"store-{flag_everything}")
        report = make_style_images(store, checked, ref, settings, rows, style="Banksy", partition="Banksy",
                                   run_id="r1", batch_size=2)  # fmt: skip
        assert report.safety_flagged == (3 if flag_everything else 0)
        for row in rows:
            png = store.read_bytes(image_key_path(row.key))
            provenance = read_provenance(png)
            assert provenance.safety_flagged is flag_everything
            with Image.open(io.BytesIO(png)) as image:
                assert bool(np.asarray(image).max() == 0) is flag_everything, "flagged: all black"
                assert image.text["parameters"].endswith(", Safety checker: on")
            # Flagged or not, the PNG says the checker looked at it: its key follows from what it records.
            assert provenance.safety_checker is True
            recorded = GenerationSettings(
                model_id=provenance.model_id, model_revision=provenance.model_revision, scheduler=provenance.scheduler,
                steps=provenance.steps, guidance_scale=provenance.guidance_scale, width=provenance.width,
                height=provenance.height, negative_prompt=provenance.negative_prompt,
                safety_checker=provenance.safety_checker,
            )
            assert content_key(recorded, provenance.prompt, provenance.seed) == row.key
        merged, _ = catalog.merge_catalog(store, "Banksy", rows)
        assert merged["safety_checker"].to_pylist() == [True] * 3
        assert "safety checker on" in settings_text(merged.to_pylist()[0])


def test_each_png_records_what_made_it_field_by_field_and_its_catalog_record_says_the_same(loaded, tmp_path):
    from datetime import datetime, timedelta, timezone

    from sd_assets.domain.pngmeta import Provenance

    settings = dataclasses.replace(SETTINGS, model_revision="f" * 40, negative_prompt="blurry", steps=2)
    rows = [dataclasses.replace(row, negative_prompt="blurry", key=content_key(settings, row.prompt, row.seed))
            for row in ROWS[1:3]]  # fmt: skip
    ref = ModelRef("tiny-random", "f" * 40, "PNDMScheduler", 0, 0, variant="fp16")
    store = LocalStore(tmp_path)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    make_style_images(store, loaded, ref, settings, rows, style="Banksy", partition="banksy-partition", run_id="r7",
                      batch_size=2)  # fmt: skip
    after = datetime.now(timezone.utc)
    records = {}
    for key in store.list_keys(catalog.pending_prefix("Banksy")):
        if key.endswith(".jsonl"):
            records.update({record["key"]: record for record in map(json.loads, store.read_text(key).splitlines())})

    for row in rows:
        png = store.read_bytes(image_key_path(row.key))
        made = read_provenance(png)
        assert made == Provenance(
            key=row.key, subject=row.subject, style="Banksy", image_index=row.image_index, prompt=row.prompt,
            negative_prompt="blurry", seed=row.seed, model_id="tiny-random", model_revision="f" * 40,
            scheduler="PNDMScheduler", steps=2, guidance_scale=7.5, width=64, height=64, run_id="r7",
            partition="banksy-partition", created=made.created, device="cpu", dtype="float32", deep_cache="",
            model_variant="fp16", software=engine.software_versions(), safety_flagged=False, safety_checker=False,
            cpu_threads=torch.get_num_threads(),
        )  # fmt: skip
        assert before <= datetime.fromisoformat(made.created) <= after + timedelta(seconds=1)
        assert made.created.endswith("+00:00"), "times are UTC"
        assert records[row.key] == {**dataclasses.asdict(made), "path": store.location(image_key_path(row.key))}
        with Image.open(io.BytesIO(png)) as image:
            assert image.text["parameters"].splitlines()[:2] == [row.prompt, "Negative prompt: blurry"]
    assert rows[0].image_index == 1 and rows[1].subject == "ada lovelace", "rows that tell index and subject apart"


def test_a_second_try_of_a_run_leaves_the_first_tries_pending_records_and_intent_in_place(loaded, tmp_path):
    # A step tried again after a store outage runs under the same run id.
    store = LocalStore(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    for attempt, rows in enumerate([ROWS[:2], ROWS[2:4]]):
        make_style_images(store, loaded, ref, SETTINGS, rows, style="Banksy", partition="Banksy", run_id="r1",
                          batch_size=2, attempt=attempt)  # fmt: skip
    pending = sorted(store.list_keys(catalog.pending_prefix("Banksy")))
    batches = [store.read_text(key) for key in pending if key.endswith(".jsonl")]
    records = [json.loads(line) for batch in batches for line in batch.splitlines()]
    assert sorted(record["key"] for record in records) == sorted(row.key for row in ROWS[:4])
    assert {record["run_id"] for record in records} == {"r1"}
    intents = [json.loads(store.read_text(key)) for key in pending if key.endswith(catalog.INTENT_SUFFIX)]
    assert sorted(intents) == sorted([sorted(row.key for row in ROWS[:2]), sorted(row.key for row in ROWS[2:4])])


def test_a_png_names_every_library_that_computed_its_pixels_the_text_encoders_too(loaded, tmp_path):
    import diffusers
    import transformers

    store = LocalStore(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    make_style_images(store, loaded, ref, SETTINGS, ROWS[:1], style="Banksy", partition="Banksy", run_id="r1",
                      batch_size=1)  # fmt: skip
    made = read_provenance(store.read_bytes(image_key_path(ROWS[0].key)))
    # The prompt's embeddings come from transformers' CLIP text encoder: another version can move the pixels.
    assert made.software == (
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


def test_a_png_made_on_the_cpu_records_the_threads_torch_computed_it_with(loaded, tmp_path):
    store = LocalStore(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made_on_one = render_all(loaded, ROWS[:1], batch_size=1)[ROWS[0].key]
        make_style_images(store, loaded, ref, SETTINGS, ROWS[:1], style="Banksy", partition="Banksy", run_id="r1",
                          batch_size=1)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    made = read_provenance(store.read_bytes(image_key_path(ROWS[0].key)))
    # What a user sets (torch.set_num_threads) to make the same pixels bit for bit on another machine.
    assert made.cpu_threads == 1
    records = [json.loads(line) for key in store.list_keys(catalog.pending_prefix("Banksy")) if key.endswith(".jsonl")
               for line in store.read_text(key).splitlines()]  # fmt: skip
    assert [record["cpu_threads"] for record in records] == [1]
    with Image.open(io.BytesIO(store.read_bytes(image_key_path(ROWS[0].key)))) as image:
        assert np.array_equal(np.asarray(image), made_on_one)


def test_every_record_of_a_run_reaches_the_catalog_from_its_flushes_none_from_pngs(loaded, tmp_path, monkeypatch):
    from sd_assets.domain import generation

    # Records go to the store every RECORD_FLUSH_EVERY images: 6 images make batches of 4 and 2.
    monkeypatch.setattr(generation, "RECORD_FLUSH_EVERY", 4)
    store = LocalStore(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    make_style_images(store, loaded, ref, SETTINGS, ROWS, style="Banksy", partition="Banksy", run_id="r1", batch_size=1)

    batches = sorted(key for key in store.list_keys(catalog.pending_prefix("Banksy")) if key.endswith(".jsonl"))
    records = [[json.loads(line)["key"] for line in store.read_text(key).splitlines()] for key in batches]
    # Each record in one batch: a flush writes the records since the last one, not those before it again.
    assert [len(batch) for batch in records] == [4, 2]
    assert sorted(key for batch in records for key in batch) == sorted(row.key for row in ROWS)
    merged, report = catalog.merge_catalog(store, "Banksy", ROWS)
    assert (report.added_from_records, report.recovered_from_png) == (6, 0)
    assert sorted(merged["key"].to_pylist()) == sorted(row.key for row in ROWS)


def test_a_prompt_of_exactly_the_tokens_the_text_encoder_reads_is_made_one_more_is_refused(loaded):
    tokenizer = loaded.pipeline.tokenizer
    # The start and end tokens count too; the tiny model's vocabulary has a token per letter.
    prompts = [f"{'a ' * n}by Banksy" for n in range(80)]
    fits = next(p for p in prompts if len(tokenizer(p).input_ids) == tokenizer.model_max_length == 77)
    over = prompts[prompts.index(fits) + 1]
    rows = [dataclasses.replace(ROWS[0], prompt=fits), dataclasses.replace(ROWS[1], prompt=over)]

    overlong = engine.overlong_prompts(loaded, rows)
    assert [overlong.refuses(row) for row in rows] == [False, True]
    # The message says why the demo's limit is so short: about 75 letters, not 75 words.
    message = overlong.message("Banksy", rows[1:], made=1)
    assert message.startswith("Banksy: the text encoder reads 77 tokens of a prompt (this model's tokenizer reads a "
                              "token a letter, as the demo's tiny-random does: about 75 characters of prompt, spaces "
                              "not counted, where a real model's reads most words as one token), and these are longer: ")  # fmt: skip


def test_counting_a_long_prompts_tokens_prints_no_warning_of_the_tokenizer(loaded):
    # transformers warns a tokenizer once that a text is over its length ("... will result in indexing
    # errors"): counting is what the check is for, and the prompt is not run. Its logger's handler
    # holds the stream of whichever test configured it: the test listens on the logger itself.
    from transformers import CLIPTokenizer

    from sd_assets.domain.tiny_model import tiny_vocabulary

    fresh = copy.copy(loaded.pipeline)
    fresh.tokenizer = CLIPTokenizer(vocab=tiny_vocabulary(), merges=[], model_max_length=77)
    rows = [ROWS[0], dataclasses.replace(ROWS[1], prompt="a " * 100)]
    heard = _Heard()
    logging.getLogger("transformers").addHandler(heard)
    try:
        overlong = engine.overlong_prompts(dataclasses.replace(loaded, pipeline=fresh), rows)
    finally:
        logging.getLogger("transformers").removeHandler(heard)
    assert list(overlong.tokens.values()) == [102]
    assert not [message for message in heard.messages if "Token indices sequence length" in message]


class _Heard(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_asking_for_the_safety_checker_of_a_model_without_one_is_a_clear_error(loaded):
    with pytest.raises(SdAssetsError, match=r"has no safety checker; set inference.safety_checker: false"):
        engine.load_pipeline(loaded.folder, "cpu", "float32", safety_checker=True)


def test_a_model_folder_with_damaged_weights_fails_to_load_saying_how_to_fetch_it_again(tiny_model_store, tmp_path):
    source = next((tiny_model_store.root / "models" / "tiny-random").glob("*/model_index.json")).parent
    folder = shutil.copytree(source, tmp_path / "model")
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    expected = rf"^cannot load a Stable Diffusion pipeline from {re.escape(str(folder))}: .*If its files were damaged, "
    with pytest.raises(SdAssetsError, match=expected + r"materialize model_weights \(or run the whole generate_images"):
        engine.load_pipeline(folder, "cpu", "float32")


def test_the_overlong_prompt_message_counts_one_image_as_one():
    long_prompt = "a " * 80 + "by Banksy"
    refused = [PromptRow("long subject", "Banksy", 0, long_prompt, "", 1, "0" * 64)]
    overlong = engine.OverlongPrompts(limit=77, tokens={long_prompt: 83})
    message = overlong.message("Banksy", refused, made=1)
    assert message.startswith("Banksy: the text encoder reads 77 tokens of a prompt, and these are longer: the prompt "
                              "of 'long subject' (83 tokens). The pipeline would cut them: each picture would show "
                              "only the start of the prompt it is filed under (a style at the end is lost: every "
                              "style, the same picture). Shorten them")  # fmt: skip
    assert message.endswith("Not made: 1 image of the prompts above; made: 1 other image of the style")


def test_a_negative_prompt_longer_than_the_text_encoder_reads_refuses_its_rows_and_is_named_once(loaded):
    negative = "blurry " * 80
    rows = [dataclasses.replace(row, negative_prompt=negative) for row in ROWS[:3:2]]  # two subjects
    overlong = engine.overlong_prompts(loaded, [*rows, ROWS[1]])
    tokens = overlong.tokens[negative]
    assert tokens > overlong.limit == 77 and set(overlong.tokens) == {negative}
    assert [overlong.refuses(row) for row in (*rows, ROWS[1])] == [True, True, False]
    assert overlong.reason(rows[0]) == f"its negative prompt is {tokens} tokens, over the 77 the text encoder reads"
    message = overlong.message("Banksy", rows, made=1)
    assert f"and these are longer: the grid's negative prompt ({tokens} tokens). The pipeline would cut them: the " \
        "end of the negative prompt would steer no picture, though each would record it. Shorten them" in message
    assert "style at the end" not in message  # the prompts themselves are whole
    assert message.endswith("Not made: 2 images of the prompts above; made: 1 other image of the style")


@pytest.mark.parametrize(
    "error",
    [
        # What torch raised on a 2-core CPU for a 4096x4096 image under a 5 GB limit.
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),  # fmt: skip
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
    ids=["cpu-allocator", "OutOfMemoryError"],
)
def test_running_out_of_memory_names_the_settings_to_lower_and_keeps_the_images_made(
    loaded, tmp_path, monkeypatch, error
):
    forward = loaded.pipeline.unet.forward
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", counted)
    render_all(loaded, ROWS[:1], batch_size=1)
    calls_an_image = len(calls)

    def runs_out_after_two_images(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3 * calls_an_image:
            raise error
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", runs_out_after_two_images)
    store = LocalStore(tmp_path)
    ref = ModelRef("tiny-random", "rev", "PNDMScheduler", 0, 0)
    with pytest.raises(SdAssetsError) as failed:
        make_style_images(store, loaded, ref, SETTINGS, ROWS, style="Banksy", partition="Banksy", run_id="r1",
                          batch_size=2)  # fmt: skip

    assert str(failed.value) == (
        "out of memory on the CPU rendering one 64x64 image; make inference.width and height smaller "
        "(the images made before it are kept)"
    )
    assert [store.exists(image_key_path(row.key)) for row in ROWS] == [True, True, False, False, False, False]
    assert sorted(catalog.read_catalog(store)["key"]) == sorted(row.key for row in ROWS[:2])


def test_a_gpu_out_of_memory_goes_on_at_half_the_batch_and_makes_every_image(loaded, monkeypatch):
    alone = render_all(loaded, ROWS, batch_size=1)
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    forward = loaded.pipeline.unet.forward

    def fits_one_image(sample, *args, **kwargs):  # with guidance, one image is a UNet batch of 2
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", fits_one_image)
    images: dict[str, np.ndarray] = {}
    halvings: list[tuple[int, int]] = []
    with engine.BoundedWriter(workers=2, max_pending=8) as writer:
        stats = engine.generate(on_gpu, ROWS, SETTINGS, 4,
                                lambda row, pixels, _flagged: images.update({row.key: pixels}), writer,
                                on_smaller_batches=lambda old, new: halvings.append((old, new)))  # fmt: skip

    assert halvings == [(4, 2), (2, 1)] and (stats.generated, stats.batch_size) == (6, 1)
    assert set(images) == set(alone) and all(_close(images[key], alone[key]) for key in alone)

    # One image that does not fit either: the settings to lower, and the images made before it kept.
    calls: list[int] = []
    monkeypatch.setattr(loaded.pipeline.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    render_all(loaded, ROWS[:1], batch_size=1)
    calls_an_image = len(calls)

    def room_for_three_images(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4 * calls_an_image:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", room_for_three_images)
    made: list[str] = []
    with pytest.raises(SdAssetsError) as failed, engine.BoundedWriter(workers=1, max_pending=8) as writer:
        engine.generate(on_gpu, ROWS, SETTINGS, 1, lambda row, pixels, _flagged: made.append(row.key), writer)
    assert str(failed.value) == (
        "out of memory on cuda rendering one 64x64 image; make inference.width and height smaller, or free the GPU "
        "of other work (the images made before it are kept)"
    )
    assert len(made) == 3


def test_a_short_batch_that_runs_out_of_gpu_memory_is_halved_from_its_own_rows_once(loaded, monkeypatch):
    """Three images left at batch size 32, room for two: one failed try, then batches of two; not
    the same three rows tried again at 16, 8 and 4."""
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", False)
    forward = loaded.pipeline.unet.forward
    failed_tries: list[int] = []

    def fits_two_images(sample, *args, **kwargs):  # with guidance, one image is a UNet batch of 2
        if sample.shape[0] > 4:
            failed_tries.append(sample.shape[0] // 2)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", fits_two_images)
    made: list[str] = []
    halvings: list[tuple[int, int]] = []
    with engine.BoundedWriter(workers=1, max_pending=8) as writer:
        stats = engine.generate(on_gpu, ROWS[:3], SETTINGS, 32, lambda row, _pixels, _flagged: made.append(row.key),
                                writer, on_smaller_batches=lambda old, new: halvings.append((old, new)))  # fmt: skip

    assert failed_tries == [3] and halvings == [(32, 2)] and stats.out_of_memory_rows == 3
    assert sorted(made) == sorted(row.key for row in ROWS[:3]) and (stats.generated, stats.batch_size) == (3, 2)


def test_a_padded_batch_that_runs_out_of_memory_is_not_counted_as_padding(loaded, monkeypatch):
    """Three rows filled to a compiled batch of four, which does not fit: two, then one filled to
    two. One image was rendered only as padding, not two."""
    on_gpu = engine.LoadedPipeline(loaded.pipeline, loaded.folder, "cuda", "float32", "PNDMScheduler", True,
                                   {(4, 64, 64)})  # fmt: skip
    forward = loaded.pipeline.unet.forward

    def fits_two_images(sample, *args, **kwargs):
        if sample.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(loaded.pipeline.unet, "forward", fits_two_images)
    with engine.BoundedWriter(workers=1, max_pending=8) as writer:
        stats = engine.generate(on_gpu, ROWS[:3], SETTINGS, 4, lambda *_: None, writer)

    assert (stats.generated, stats.padded, stats.out_of_memory_rows, stats.batch_size) == (3, 1, 4, 2)


def test_auto_remembers_a_smaller_batch_only_when_its_own_answer_did_not_fit(loaded, tmp_path):
    on_gpu = engine.LoadedPipeline(None, loaded.folder, "cuda", "float16", "PNDMScheduler", False)
    memory_file = tmp_path / "auto-batch-sizes.json"
    key = engine.auto_batch_key(on_gpu, SETTINGS)
    memory_file.write_text(json.dumps({key: 32}))

    # A style's 3 images (or a short last batch) that did not fit: the GPU was short of memory for
    # the while, and 32 stays for the next run.
    assert not engine.remember_after_running_out_of_memory(on_gpu, SETTINGS, memory_file, 3, 2)
    assert json.loads(memory_file.read_text()) == {key: 32}
    # A batch of 32 that did not fit: 32 was too many.
    assert engine.remember_after_running_out_of_memory(on_gpu, SETTINGS, memory_file, 32, 16)
    assert json.loads(memory_file.read_text()) == {key: 16}
    other = dataclasses.replace(SETTINGS, width=96)  # nothing remembered for it: nothing to correct
    assert not engine.remember_after_running_out_of_memory(on_gpu, other, memory_file, 8, 4)
    assert json.loads(memory_file.read_text()) == {key: 16}


def test_running_out_of_memory_while_compiling_a_shape_counts_as_running_out_of_memory():
    """Inductor's autotuning allocates on the GPU as it compiles: torch hands that error on wrapped."""

    def backend(_graph, _inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    doubled = torch.compile(lambda x: x * 2, backend=backend, fullgraph=True, dynamic=False)
    with pytest.raises(Exception) as raised:
        doubled(torch.ones(3))
    assert not isinstance(raised.value, torch.OutOfMemoryError) and engine.is_out_of_memory(raised.value)
    torch._dynamo.reset()
    # An error of its own raised while an out-of-memory error was being handled is not one.
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError:
            raise RuntimeError("Expected all tensors to be on the same device") from None
    except RuntimeError as other:
        assert not engine.is_out_of_memory(other)


def test_a_compiled_unet_takes_more_batch_shapes_than_dynamo_allows_by_default(loaded, monkeypatch):
    """Halving after running out of memory, short last styles and other sizes each compile a
    shape: past dynamo's default of 8 a whole-graph compile is a hard error, not a slower call."""
    # torch's own patch, not monkeypatch: pytest undoes a torch config value by deleting it, which
    # hides it from every later compile of this process ("recompile_limit does not exist").
    compile_graph = torch.compile
    # The eager backend stands in for Inductor: the guards and the count of recompiles are dynamo's either way.
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_graph(
        model, backend="eager", **{k: v for k, v in kwargs.items() if k != "mode"}))  # fmt: skip
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=8):  # torch's default, whatever ran before
            layer = engine.compiled_unet(torch.nn.Conv2d(2, 2, 1))
            for batch in range(1, 13):
                assert layer(torch.ones(batch, 2, 4, 4)).shape == (batch, 2, 4, 4)
    finally:
        torch._dynamo.reset()
    # What a loaded pipeline compiles (the UNet, DeepCache's paths, the VAE decoder) is let recompile as often.
    # Loaded anew: an earlier test of this process may have loaded the same pipeline, kept per process.
    monkeypatch.setattr(engine, "_PIPELINES", {})
    with torch._dynamo.config.patch(recompile_limit=8):
        engine.load_pipeline(loaded.folder, "cpu", "float32", compile_unet=True,
                             deep_cache=DeepCache(interval=2, branch=0), tuning=engine.Tuning(compile_vae=True))
        assert torch._dynamo.config.recompile_limit == engine.RECOMPILE_LIMIT
    assert torch._dynamo.config.recompile_limit  # still there for the compiles of later tests


def test_loading_another_setting_on_a_device_lets_go_of_the_pipeline_loaded_there_before(loaded, monkeypatch):
    """A long-lived process (the demo, a benchmark comparing settings) keeps one pipeline a device,
    not one for every scheduler, dtype or DeepCache setting it ever ran."""
    monkeypatch.setattr(engine, "_PIPELINES", {})
    first = engine.load_pipeline(loaded.folder, "cpu", "float32")
    assert engine.load_pipeline(loaded.folder, "cpu", "float32") is first  # the same setting: loaded once
    first_unet = weakref.ref(first.pipeline.unet)
    del first
    second = engine.load_pipeline(loaded.folder, "cpu", "float32", scheduler="EulerDiscreteScheduler")
    assert first_unet() is None, "the first pipeline's UNet is still held"
    assert list(engine._PIPELINES.values()) == [second]
    # Another device's pipeline is not this device's to let go (a plain object stands in for a GPU's).
    on_gpu = engine.LoadedPipeline(object(), loaded.folder, "cuda:1", "float16", "PNDMScheduler", False)
    engine._PIPELINES[("elsewhere",)] = on_gpu
    third = engine.load_pipeline(loaded.folder, "cpu", "float32")
    assert list(engine._PIPELINES.values()) == [on_gpu, third]
    assert third.scheduler != second.scheduler

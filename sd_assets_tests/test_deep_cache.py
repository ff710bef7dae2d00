"""DeepCache: the full path is the UNet's own arithmetic, the cached path skips what it should,
and a pipeline runs the whole UNet only every ``interval`` calls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from sd_assets.domain import deep_cache, engine
from sd_assets.domain.deep_cache import DeepCache
from sd_assets.domain.errors import ModelError, SdAssetsError
from sd_assets.domain.tiny_model import TINY_SPEC
from sd_assets_tests.test_engine import ROWS, SETTINGS


def tiny_unet(**changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TINY_SPEC["unet"], **changes}).eval()


def inputs(unet, batch: int = 2, height: int = 8, width: int = 8):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, unet.config.in_channels, height, width, generator=generator)
    prompts = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), prompts


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_the_full_path_is_the_unets_own_forward_bit_for_bit(unet):
    layers = deep_cache.unet_layers(unet)
    # 8x8 latents, and 9x7 ones that make the UNet pass each upsampler its output size.
    for size in ((8, 8), (9, 7)):
        sample, timestep, prompts = inputs(unet, 2, *size)
        with torch.no_grad():
            expected = unet(sample, timestep, encoder_hidden_states=prompts).sample
            for branch in range(deep_cache.branch_count(unet)):
                output, kept = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch)
                assert torch.equal(output, expected), (size, branch)
                # Fed the state it kept, the cached path ends where the full one did.
                again, _ = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch, kept)
                assert torch.equal(again, expected), (size, branch)


def test_the_cached_path_uses_the_kept_state_and_costs_less(unet):
    layers = deep_cache.unet_layers(unet)
    sample, timestep, prompts = inputs(unet)
    flops = {}
    with torch.no_grad():
        full, kept = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, 0)
        # From another step's state the answer moves: the deep features really are reused.
        other, _ = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, 0, torch.zeros_like(kept))
        assert not torch.allclose(other, full)
        for branch in (0, 3, 5):
            _, kept = deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch)
            with FlopCounterMode(display=False) as counter:
                deep_cache.unet_forward(unet, layers, sample, timestep, prompts, branch, kept)
            flops[branch] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            deep_cache.unet_forward(unet, layers, sample, timestep, prompts, 0)
    assert flops[0] < flops[3] < flops[5] < counter.get_total_flops()


def test_the_setting_refuses_an_interval_under_two_and_a_negative_branch():
    with pytest.raises(ValueError, match="interval must be 2 or more, not 1"):
        DeepCache(interval=1)
    with pytest.raises(ValueError, match="branch must be 0 or more, not -1"):
        DeepCache(interval=3, branch=-1)


def test_a_branch_the_unet_does_not_have_or_a_unet_it_cannot_run_is_a_model_error(unet):
    assert deep_cache.branch_count(unet) == 6  # conv_in, and two layers and a downsampler, and two layers
    with pytest.raises(ModelError, match=r"branch is 6, but this UNet has 6 skip branches \(0 to 5\)"):
        deep_cache.install(unet, DeepCache(interval=2, branch=6))
    with pytest.raises(ModelError, match="this UNet uses time_cond_proj_dim"):
        deep_cache.install(tiny_unet(time_cond_proj_dim=8), DeepCache(interval=2))
    freeu = tiny_unet()
    freeu.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ModelError, match="this UNet uses FreeU"):
        deep_cache.install(freeu, DeepCache(interval=2))
    assert deep_cache.installed(unet) is None


def test_extra_unet_inputs_are_refused_not_dropped():
    unet = tiny_unet()
    deep_cache.install(unet, DeepCache(interval=2))
    sample, timestep, prompts = inputs(unet)
    with pytest.raises(ModelError, match="cannot pass \\['added_cond_kwargs'\\]"):
        unet(sample, timestep, prompts, added_cond_kwargs={"text_embeds": prompts})


@pytest.fixture(scope="module")
def folder(tiny_model_store):
    return next((tiny_model_store.root / "models" / "tiny-random").glob("*/model_index.json")).parent


def test_a_pipeline_runs_the_whole_unet_every_interval_calls(folder):
    cache = DeepCache(interval=2, branch=1)
    settings = dataclasses.replace(SETTINGS, steps=4, deep_cache=cache)
    loaded = engine.load_pipeline(folder, "cpu", "float32", deep_cache=cache)
    cached_unet = deep_cache.installed(loaded.pipeline.unet)
    assert cached_unet is not None and cached_unet.cache == cache
    plain = engine.load_pipeline(folder, "cpu", "float32")
    assert deep_cache.installed(plain.pipeline.unet) is None, "a pipeline without the option keeps its UNet"

    pixels = engine.render_batch(loaded, ROWS[:2], settings)
    # PNDM makes 5 UNet calls for 4 steps; every pipeline call starts again with a full one.
    assert (cached_unet.full_calls, cached_unet.cached_calls) == (2 * 3, 2 * 2)
    exact = engine.render_batch(plain, ROWS[:2], dataclasses.replace(SETTINGS, steps=4))
    assert pixels.shape == exact.shape and not np.array_equal(pixels, exact)
    # Rows rendered alone or together get the same pixels, as without the option.
    assert np.array_equal(engine.render_batch(loaded, ROWS[1:2], settings)[0], pixels[1])


def test_settings_and_pipeline_must_agree_on_the_option(folder):
    loaded = engine.load_pipeline(folder, "cpu", "float32")
    settings = dataclasses.replace(SETTINGS, deep_cache=DeepCache(interval=3))
    with pytest.raises(SdAssetsError, match="loaded with deep_cache None, but the images' settings ask for"):
        engine.render_batch(loaded, ROWS[:1], settings)


def test_compiled_deep_cache_makes_the_eager_pictures():
    # One layer a block: half the graph to compile on a CPU, every kind of layer still in it.
    eager_unet, compiled_unet = tiny_unet(layers_per_block=1), tiny_unet(layers_per_block=1)
    cache = DeepCache(interval=2, branch=2)
    eager = deep_cache.install(eager_unet, cache)
    compiled = deep_cache.install(compiled_unet, cache, compile_mode="default")
    sample, timestep, prompts = inputs(eager_unet)
    with torch.no_grad():
        for step in range(4):
            # The sample changes each step, as in a pipeline.
            step_sample = sample + step
            expected = eager_unet(step_sample, timestep, prompts, return_dict=False)[0]
            actual = compiled_unet(step_sample, timestep, prompts, return_dict=False)[0]
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert (compiled.full_calls, compiled.cached_calls) == (eager.full_calls, eager.cached_calls) == (2, 2)

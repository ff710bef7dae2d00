"""Per-image seeds and content keys: stable, style-independent, and sensitive to what matters."""

from dataclasses import replace

from sd_assets.domain.grid import load_grid
from sd_assets.domain.prompts import GenerationSettings, build_prompt_rows, content_key, image_seed, keys_version
from sd_assets_tests.helpers import write_grid

SETTINGS = GenerationSettings("tiny-random", "a" * 40, "PNDMScheduler", 4, 7.5, 64, 64, "")


def test_seed_depends_on_subject_and_index_not_style_or_order(tmp_path):
    grid = load_grid(write_grid(tmp_path, styles=("Banksy", "Andy Warhol")))
    banksy = build_prompt_rows(grid, "Banksy", ["alan turing", "ada lovelace"], SETTINGS)
    warhol = build_prompt_rows(grid, "Andy Warhol", ["ada lovelace", "alan turing", "grace hopper"], SETTINGS)
    seeds_banksy = {(r.subject, r.image_index): r.seed for r in banksy}
    seeds_warhol = {(r.subject, r.image_index): r.seed for r in warhol}
    assert all(seeds_warhol[k] == v for k, v in seeds_banksy.items())
    assert len({r.seed for r in banksy}) == len(banksy), "every image of a style has its own seed"
    assert banksy[0].prompt == "alan turing by Banksy"
    assert all(0 <= r.seed < 2**32 for r in warhol)


def test_seed_is_fixed_for_a_given_base_seed():
    assert image_seed(42, "alan turing", 0) == image_seed(42, "alan turing", 0)
    assert image_seed(42, "alan turing", 0) != image_seed(43, "alan turing", 0)
    assert image_seed(42, "alan turing", 0) != image_seed(42, "alan turing", 1)


def test_content_key_changes_with_every_pixel_determining_setting():
    base = content_key(SETTINGS, "alan turing by Banksy", 7)
    assert base == content_key(SETTINGS, "alan turing by Banksy", 7)
    variants = [
        content_key(SETTINGS, "alan turing by Banksy!", 7),
        content_key(SETTINGS, "alan turing by Banksy", 8),
        content_key(replace(SETTINGS, model_revision="b" * 40), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, steps=5), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, guidance_scale=7.0), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, width=128), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, negative_prompt="blurry"), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, scheduler="DDIMScheduler"), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, model_id="other/model"), "alan turing by Banksy", 7),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_keys_version_ignores_order():
    assert keys_version(["b", "a"]) == keys_version(["a", "b"])
    assert keys_version(["a"]) != keys_version(["a", "b"])

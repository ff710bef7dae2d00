"""Per-image seeds and content keys: stable, style-independent, and sensitive to what matters."""

import hashlib
import json
from dataclasses import replace

from sd_assets.domain.deep_cache import DeepCache
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
    # The README's formula, worked out by hand once: a change to it would remake every image.
    assert image_seed(42, "alan turing", 0) == int.from_bytes(
        hashlib.sha256("42\x1falan turing\x1f0".encode()).digest()[:8], "big"
    ) % 2**32
    # And as numbers, which no rewriting of the formula in both places at once can move.
    assert (image_seed(42, "alan turing", 0), image_seed(42, "alan turing", 1)) == (1678326594, 3983704924)
    assert image_seed(42, "alan turing", 0) != image_seed(43, "alan turing", 0)
    assert image_seed(42, "alan turing", 0) != image_seed(42, "alan turing", 1)


def test_content_keys_are_fixed_numbers_whichever_way_they_are_worked_out(tmp_path):
    # An image's file name: a key that moved would have every image of every store made again.
    assert content_key(SETTINGS, "alan turing by Banksy", 1678326594) == (
        "fb3adeca60b475a15ada5135d7cf5cbf3ecdf3d5b984920f81f6648e05d575e9"
    )
    every_option = replace(SETTINGS, negative_prompt="blurry", deep_cache=DeepCache(interval=3), safety_checker=True)
    assert content_key(every_option, "Émile Zola by 葛飾 北斎", 3983704924) == (
        "54532d844ee65f48fb05558bdd17d195aa807bbc86a36c9c1b4478ec07210bf9"
    )
    [first, _] = build_prompt_rows(load_grid(write_grid(tmp_path, styles=("Banksy",))), "Banksy", ["alan turing"],
                                   SETTINGS)  # fmt: skip
    assert (first.seed, first.key) == (1678326594, "fb3adeca60b475a15ada5135d7cf5cbf3ecdf3d5b984920f81f6648e05d575e9")


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
        content_key(replace(SETTINGS, height=128), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, negative_prompt="blurry"), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, scheduler="DDIMScheduler"), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, model_id="other/model"), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, deep_cache=DeepCache(interval=3)), "alan turing by Banksy", 7),
        content_key(replace(SETTINGS, deep_cache=DeepCache(interval=3, branch=1)), "alan turing by Banksy", 7),
        # An image the checker flags is blacked out: another picture, even where none is flagged.
        content_key(replace(SETTINGS, safety_checker=True), "alan turing by Banksy", 7),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_keys_of_images_made_without_deep_cache_are_those_they_had_before_the_option():
    # The payload every key was hashed from before DeepCache existed: a store's images keep
    # their keys across the upgrade, and none is made again.
    before = {
        "model_id": "tiny-random", "model_revision": "a" * 40, "scheduler": "PNDMScheduler", "steps": 4,
        "guidance_scale": 7.5, "width": 64, "height": 64, "negative_prompt": "", "prompt": "alan turing by Banksy",
        "seed": 7,
    }  # fmt: skip
    canonical = json.dumps(before, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert content_key(SETTINGS, "alan turing by Banksy", 7) == hashlib.sha256(canonical.encode()).hexdigest()


def test_a_grid_with_deep_cache_gives_its_images_their_own_keys(tmp_path):
    plain_path = write_grid(tmp_path / "plain", styles=("Banksy",))
    cached_path = write_grid(tmp_path / "cached", styles=("Banksy",))
    cached_path.write_text(cached_path.read_text().replace("batch_size: 4}", "batch_size: 4, deep_cache: {interval: 3}}"))
    rows = {}
    for name, path in (("plain", plain_path), ("cached", cached_path)):
        grid = load_grid(path)
        settings = GenerationSettings.from_grid(grid, "a" * 40, "PNDMScheduler")
        rows[name] = build_prompt_rows(grid, "Banksy", ["alan turing"], settings)
    assert GenerationSettings.from_grid(load_grid(cached_path), "a" * 40, "PNDM").deep_cache == DeepCache(3, 0)
    assert [r.seed for r in rows["plain"]] == [r.seed for r in rows["cached"]]
    assert not {r.key for r in rows["plain"]} & {r.key for r in rows["cached"]}


def test_without_guidance_the_negative_prompt_is_unused_and_neither_keyed_nor_recorded(tmp_path):
    rows = {}
    for guidance in (1.0, 7.5):
        for negative in ("", "blurry"):
            path = write_grid(tmp_path / f"{guidance}-{negative}", styles=("Banksy",))
            path.write_text(
                path.read_text().replace('guidance_scale: 7.5', f"guidance_scale: {guidance}")
                .replace('negative_prompt: ""', f'negative_prompt: "{negative}"')
            )  # fmt: skip
            grid = load_grid(path)
            settings = GenerationSettings.from_grid(grid, "a" * 40, "PNDMScheduler")
            rows[guidance, negative] = build_prompt_rows(grid, "Banksy", ["alan turing"], settings)
    # At guidance 1 the pipeline runs no unconditional pass: the negative prompt changes no pixel.
    assert rows[1.0, "blurry"] == rows[1.0, ""]
    assert {row.negative_prompt for row in rows[1.0, "blurry"]} == {""}
    # With guidance it is the picture's, and its key's.
    assert {row.negative_prompt for row in rows[7.5, "blurry"]} == {"blurry"}
    assert not {row.key for row in rows[7.5, "blurry"]} & {row.key for row in rows[7.5, ""]}


def test_keys_version_ignores_order():
    assert keys_version(["b", "a"]) == keys_version(["a", "b"])
    assert keys_version(["a"]) != keys_version(["a", "b"])


def test_a_grids_rows_carry_the_content_key_of_their_prompt_and_seed_under_any_settings(tmp_path):
    # build_prompt_rows and rows_of_other_settings work the settings' part of the key out once
    # for all rows: the keys must be content_key's, row by row.
    from dataclasses import asdict

    from sd_assets.domain.prompts import rows_from_json, rows_of_other_settings, rows_to_json

    grid = load_grid(write_grid(tmp_path, styles=("Banksy",)))
    for settings in (SETTINGS, replace(SETTINGS, deep_cache=DeepCache(interval=3)),
                     replace(SETTINGS, safety_checker=True, negative_prompt="blurry")):  # fmt: skip
        rows = build_prompt_rows(grid, "Banksy", ["alan turing", "ada lovelace"], settings)
        assert [row.key for row in rows] == [content_key(settings, row.prompt, row.seed) for row in rows]
        assert rows_of_other_settings(rows, settings) == []
        assert rows_of_other_settings(rows, replace(settings, steps=5)) == rows
        # The prompt grid's file: a JSON object per row, its fields in the dataclass's order.
        text = rows_to_json(rows)
        assert text == json.dumps([asdict(row) for row in rows], ensure_ascii=False, indent=0)
        assert rows_from_json(text) == rows


def test_a_grids_keys_spelt_into_its_settings_once_are_content_keys_for_any_text():
    # build_prompt_rows spells the settings' part of the canonical JSON once: any prompt, seed or
    # setting must come out as content_key hashes it, or every image of a grid would be made again.
    from sd_assets.domain.prompts import _key_maker, _keyed_settings

    prompts = ['alan "the" turing', "back\\slash", "tab\tnew\nline\x00nul\x1f", "Émile Zola by 葛飾 北斎", "🎨 ✓",
               "</script><b>", "\u2028\u2029", '"<sd-assets prompt>"', "<sd-assets seed>", ""]  # fmt: skip
    for settings in (SETTINGS, replace(SETTINGS, deep_cache=DeepCache(interval=3)),
                     replace(SETTINGS, safety_checker=True, negative_prompt='blurry, "ugly" \\ é'),
                     replace(SETTINGS, negative_prompt="<sd-assets prompt>"),  # spells a mark: spelt whole
                     replace(SETTINGS, guidance_scale=7.0, model_id="org/name")):  # fmt: skip
        key = _key_maker(_keyed_settings(settings))
        for prompt in prompts:
            for seed in (0, 1, 2**32 - 1):
                assert key(prompt, seed) == content_key(settings, prompt, seed), (settings, prompt, seed)


def test_the_grid_inputs_version_changes_with_what_changes_a_styles_rows_and_with_nothing_else(tmp_path):
    # Observing grid_inputs marks every style's prompt_grid stale when this version changes: a
    # batch size or dtype tried, or an unused negative prompt edited, must not.
    from sd_assets.domain.prompts import grid_inputs_version

    path = write_grid(tmp_path, styles=("Banksy",))
    original = path.read_text()
    subjects = ["alan turing", "ada lovelace"]

    def version_after(old: str, new: str) -> str:
        path.write_text(original.replace(old, new))
        return grid_inputs_version(load_grid(path), subjects)

    base = version_after("", "")
    unused = {"batch_size: 4": "batch_size: 8", "height: 64": "height: 64, dtype: float32, compile: true",
              "revision: main": "revision: main, variant: none", "storage: data": "storage: elsewhere",
              "seed: 42": "seed: 42\nmax_subjects_per_list: 50"}  # fmt: skip
    assert {new: version_after(old, new) for old, new in unused.items()} == dict.fromkeys(unused.values(), base)
    keyed = {"steps: 2": "steps: 3", "seed: 42": "seed: 7", "images_per_prompt: 2": "images_per_prompt: 3",
             "{subject} by {style}": "{subject} in the style of {style}", "width: 64": "width: 72",
             "revision: main": "revision: v2", 'negative_prompt: ""': 'negative_prompt: "blurry"',
             "height: 64": "height: 64, scheduler: DDIMScheduler, safety_checker: true",
             "batch_size: 4": "batch_size: 4, deep_cache: {interval: 3}"}  # fmt: skip
    changed = [version_after(old, new) for old, new in keyed.items()]
    assert base not in changed and len(set(changed)) == len(keyed)
    assert grid_inputs_version(load_grid(path), subjects[:1]) != grid_inputs_version(load_grid(path), subjects)
    # Without guidance the negative prompt is unused: no row holds it, and editing it changes nothing.
    without_guidance = version_after("guidance_scale: 7.5", "guidance_scale: 1.0")
    unused_negative = 'guidance_scale: 1.0, width: 64, height: 64, negative_prompt: "blurry"'
    assert version_after('guidance_scale: 7.5, width: 64, height: 64, negative_prompt: ""', unused_negative) == (
        without_guidance
    )

"""The prompt grid: one row per (subject, image index) of a style, with its seed and content key.

Owns the two identities that make generation reproducible and idempotent:
- the per-image seed, derived from the base seed, the subject and the image index (not the style,
  so every style of a subject starts from the same noise, and not the list order, so it is stable
  when lists grow or are reordered);
- the content key, a sha256 over everything that determines the pixels, which names the PNG.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sd_assets.domain.deep_cache import DeepCache
from sd_assets.domain.errors import GridError, StoreError
from sd_assets.domain.grid import GridConfig, slugify
from sd_assets.domain.store import ArtifactStore

SEED_BITS = 32


def image_seed(base_seed: int, subject: str, image_index: int) -> int:
    """A 32-bit seed (the range Stable Diffusion tools display) for one image of a subject."""
    digest = hashlib.sha256(f"{base_seed}\x1f{subject}\x1f{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**SEED_BITS)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides prompt and seed that determines an image's pixels."""

    model_id: str
    model_revision: str
    scheduler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    negative_prompt: str
    deep_cache: DeepCache | None = None
    # With the model's safety checker an image it flags is blacked out: another picture.
    safety_checker: bool = False

    def as_record(self) -> dict:
        """These settings as the catalog's columns hold them (``gallery.settings_text`` reads them)."""
        return {**asdict(self), "deep_cache": self.deep_cache.describe() if self.deep_cache else ""}

    @classmethod
    def from_grid(cls, grid: GridConfig, model_revision: str, scheduler: str) -> GenerationSettings:
        inference = grid.inference
        return cls(
            model_id=grid.model.id,
            model_revision=model_revision,
            scheduler=scheduler,
            steps=inference.steps,
            guidance_scale=float(inference.guidance_scale),
            width=inference.width,
            height=inference.height,
            # Classifier-free guidance is off at a scale of 1 or less, and the negative prompt with
            # it: keyed and recorded as none, so changing an unused one makes nothing again.
            negative_prompt=inference.negative_prompt if inference.guidance_scale > 1 else "",
            deep_cache=DeepCache(**inference.deep_cache.model_dump()) if inference.deep_cache else None,
            safety_checker=inference.safety_checker,
        )


def _keyed_settings(settings: GenerationSettings) -> dict:
    """The fields of ``settings`` a content key hashes (``asdict`` is half the cost of a key: a
    grid's rows work them out once, not once a row).

    Without DeepCache and the safety checker the settings hash as they did before those options
    existed, so images made before them keep their keys (and are not made again).
    """
    fields = asdict(settings)
    if settings.deep_cache is None:
        del fields["deep_cache"]
    if not settings.safety_checker:
        del fields["safety_checker"]
    return fields


def _content_key(keyed_settings: dict, prompt: str, seed: int) -> str:
    payload = {**keyed_settings, "prompt": prompt, "seed": seed}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_PROMPT_MARK, _SEED_MARK = "<sd-assets prompt>", "<sd-assets seed>"


def _key_maker(keyed_settings: dict) -> Callable[[str, int], str]:
    """``_content_key`` for many prompts under one set of settings, the same keys 5 times as fast
    (0.95 µs a key, not 5.2, on a 2-core VM): the settings' part of the canonical JSON is spelt
    once, and each key spells only its prompt and seed into it. json.dumps of the whole was 70% of
    building a grid's rows, which a gallery index of 100,000 subjects in 50 styles spent 113 s on
    (profiled)."""
    template = json.dumps({**keyed_settings, "prompt": _PROMPT_MARK, "seed": _SEED_MARK},
                          sort_keys=True, ensure_ascii=False, separators=(",", ":"))  # fmt: skip
    prompt_mark, seed_mark = json.dumps(_PROMPT_MARK), json.dumps(_SEED_MARK)
    if template.count(prompt_mark) != 1 or template.count(seed_mark) != 1:  # a setting spells a mark
        return lambda prompt, seed: _content_key(keyed_settings, prompt, seed)
    head, rest = template.split(prompt_mark)
    middle, tail = rest.split(seed_mark)
    encode = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) spells a string with

    def key(prompt: str, seed: int) -> str:
        canonical = head + encode(prompt) + middle + int.__repr__(seed) + tail
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    return key


def content_key(settings: GenerationSettings, prompt: str, seed: int) -> str:
    """sha256 hex of the canonical JSON of the settings (those ``_keyed_settings`` gives), prompt and seed."""
    return _content_key(_keyed_settings(settings), prompt, seed)


@dataclass(frozen=True)
class PromptRow:
    """One image to make: which subject and style, its prompt, seed and content key."""

    subject: str
    style: str
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    key: str


def build_prompt_rows(
    grid: GridConfig, style: str, subjects: list[str], settings: GenerationSettings
) -> list[PromptRow]:
    """The rows of one style: every subject times ``images_per_prompt``, in subject order."""
    style = grid.require_style(style)
    key = _key_maker(_keyed_settings(settings))
    rows = []
    for subject in subjects:
        prompt = grid.prompt(subject, style)
        for index in range(grid.images_per_prompt):
            seed = image_seed(grid.seed, subject, index)
            rows.append(
                PromptRow(
                    subject=subject,
                    style=style,
                    image_index=index,
                    prompt=prompt,
                    negative_prompt=settings.negative_prompt,
                    seed=seed,
                    key=key(prompt, seed),
                )
            )
    return rows


def keys_version(keys: list[str]) -> str:
    """A short, order-independent hash of a set of content keys: a partition's data version."""
    digest = hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()
    return digest[:16]


def grid_inputs_version(config: GridConfig, subjects: list[str]) -> str:
    """A short hash of what every style's prompt grid is built from: the grid's template, seed and
    images per prompt, the settings a content key hashes, and the subjects, in order. Not the grid
    file's bytes, its list of styles, the lists' files or the settings no key holds (batch size,
    dtype, compile, storage): changing those changes no style's rows, and would mark every style's
    prompt grid stale in the UI."""
    # The model's revision and scheduler as the grid names them: model_weights' version covers
    # what they resolve to.
    settings = GenerationSettings.from_grid(config, config.model.revision, config.inference.scheduler or "")
    grid = {
        "prompt_template": config.prompt_template,
        "images_per_prompt": config.images_per_prompt,
        "seed": config.seed,
        "settings": _keyed_settings(settings),
    }
    text = json.dumps({"grid": grid, "subjects": subjects}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid_key(style: str) -> str:
    """Store key of a style's prompt grid."""
    return f"grids/{slugify(style)}.json"


def rows_to_json(rows: list[PromptRow]) -> str:
    # vars, not asdict: a row's fields are plain values, and asdict's copying was 60% of the time.
    return json.dumps([vars(row) for row in rows], ensure_ascii=False, indent=0)


def rows_from_json(text: str) -> list[PromptRow]:
    return [PromptRow(**item) for item in json.loads(text)]


def write_prompt_rows(store: ArtifactStore, style: str, rows: list[PromptRow]) -> None:
    store.write_text(grid_key(style), rows_to_json(rows))


def read_prompt_rows(store: ArtifactStore, style: str) -> list[PromptRow]:
    """The style's prompt grid as ``prompt_grid`` last wrote it.

    Raises:
        GridError: the style has no prompt grid in the store yet.
        StoreError: the file is not one ``write_prompt_rows`` wrote (cut short, overwritten).
    """
    key = grid_key(style)
    if not store.exists(key):
        raise GridError(f"style {style!r} has no prompt grid in {store.location()}; materialize prompt_grid first")
    try:
        return rows_from_json(store.read_text(key))
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(
            f"{store.location(key)} is not a prompt grid ({exc}); a run of the style {style!r} writes it again"
        ) from None


def refused_key(style: str) -> str:
    """Store key of the images a style's last generation refused, and why (its gallery shows it)."""
    return f"grids/{slugify(style)}.refused.json"


def write_refused(store: ArtifactStore, style: str, reasons: dict[str, str]) -> None:
    """Record ``reasons`` (content key -> why that image was not made) as the style's refusals;
    none removes the record."""
    key = refused_key(style)
    if reasons:
        store.write_text(key, json.dumps(reasons, ensure_ascii=False, indent=0))
    elif store.exists(key):  # a warm run writes nothing
        store.delete(key)


def read_refused(store: ArtifactStore, style: str) -> dict[str, str]:
    """The style's refusals as ``write_refused`` left them; none when there is no readable record
    (it only explains a gap on a page, which then reads "not made yet")."""
    try:  # one request: no record reads as a StoreError too
        reasons = json.loads(store.read_text(refused_key(style)))
    except (StoreError, ValueError):
        return {}
    return reasons if isinstance(reasons, dict) else {}


def rows_of_other_settings(rows: list[PromptRow], settings: GenerationSettings) -> list[PromptRow]:
    """The rows whose keys are not the content keys of their prompts and seeds under ``settings``."""
    key = _key_maker(_keyed_settings(settings))
    return [row for row in rows if key(row.prompt, row.seed) != row.key]


def check_rows_match_settings(
    store: ArtifactStore, style: str, rows: list[PromptRow], settings: GenerationSettings, grid_source: object
) -> None:
    """Refuse to make images whose stored keys were computed from other settings.

    The prompt grid is written by one step and read by a later one; the grid file or the model
    revision may change in between (an image step materialized alone, a run waiting on the
    style's lock). An image made then would carry the new settings under a key of the old ones,
    and every later run would take it for the old image.

    Raises:
        GridError: a row's key is not the content key of its prompt and seed under ``settings``.
    """
    stale = rows_of_other_settings(rows, settings)
    if stale:
        raise GridError(
            f"the prompt grid of {style!r} ({store.location(grid_key(style))}) was built with other settings "
            f"than {grid_source} and model {settings.model_id}@{settings.model_revision[:10]} give now "
            f"({len(stale)} of {len(rows)} images to make would not match their keys); materialize prompt_grid "
            "again before style_images (the generate_images job runs both)"
        )

"""PNG files that carry their own generation parameters.

Owns the two text chunks every image gets: ``parameters`` in the format the AUTOMATIC1111 web UI
writes (so the tools people already use to read Stable Diffusion images understand ours), and
``sd-assets`` with the full provenance as JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields as dataclass_fields

from PIL import Image, PngImagePlugin

from sd_assets.domain.schedulers import SAMPLER_NAMES

PARAMETERS_CHUNK = "parameters"
PROVENANCE_CHUNK = "sd-assets"
# zlib level 4 encodes several times faster than the default 6 for ~5% larger files.
PNG_COMPRESS_LEVEL = 4


@dataclass(frozen=True)
class Provenance:
    """Everything needed to trace an image to what made it, and to make it again."""

    key: str
    subject: str
    style: str
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    model_id: str
    model_revision: str
    scheduler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    run_id: str
    partition: str
    created: str
    device: str
    dtype: str
    # The DeepCache setting ("interval 3, branch 0"), or "" for the full computation (and in
    # images made before the option existed).
    deep_cache: str = ""
    # The weights variant loaded ("fp16", or "" for the plain weights) and the libraries that
    # computed the pixels ("torch 2.13.0, diffusers 0.42.1, transformers 5.25.0"; images made before
    # the text encoder's library was recorded name the first two): both move pixels by rounding, not
    # the picture, so they are recorded, not hashed. "" in images made before they were recorded.
    model_variant: str = ""
    software: str = ""
    # The model's safety checker flagged the image and blacked it out (only with inference.safety_checker).
    safety_flagged: bool = False
    # The model's safety checker looked at the image (inference.safety_checker): a setting of the
    # content key, flagged or not. False in images made before it was recorded.
    safety_checker: bool = False
    # The threads torch computed with on a CPU: at another count its sums run in another order and
    # a few pixels move by one level. 0 on a GPU (they compute none of the pixels) and in images
    # made before it was recorded.
    cpu_threads: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


_PROVENANCE_FIELDS = frozenset(field.name for field in dataclass_fields(Provenance))


def a1111_parameters(p: Provenance) -> str:
    """The ``parameters`` text, as the AUTOMATIC1111 web UI writes it."""
    sampler = SAMPLER_NAMES.get(p.scheduler, p.scheduler)
    settings = (
        f"Steps: {p.steps}, Sampler: {sampler}, CFG scale: {p.guidance_scale:g}, Seed: {p.seed}, "
        # Not as "Model hash", which the web UI's readers take for a checkpoint file's sha256 (and
        # look the model up by): a hub commit is no such hash.
        f"Size: {p.width}x{p.height}, Model: {p.model_id}, Model revision: {p.model_revision}"
    )
    if p.deep_cache:
        settings += f", DeepCache: {p.deep_cache.replace(',', ';')}"
    if p.safety_checker:
        settings += ", Safety checker: on"
    # The web UI leaves the negative prompt's line out when there is none.
    negative = f"Negative prompt: {p.negative_prompt}\n" if p.negative_prompt else ""
    return f"{p.prompt}\n{negative}{settings}"


def encode_png(image: Image.Image, provenance: Provenance) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, a1111_parameters(provenance))
    info.add_text(PROVENANCE_CHUNK, provenance.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_provenance(data: bytes) -> Provenance:
    """The provenance stored in a PNG made by ``encode_png``, read without decoding its pixels,
    from a whole and sound file: each chunk's checksum is checked, to the file's end.

    Raises:
        ValueError: not such a PNG: a chunk's checksum is wrong, its header claims more pixels
            than Pillow opens (a decompression bomb), or its provenance is not JSON.
        KeyError: it has no provenance chunk.
        OSError: it is not an image Pillow can open, or it is cut short.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # ``info``, not ``text``: the text chunks before the pixels, where ``encode_png`` puts them.
            # ``text`` decodes every pixel to look for more after them (a 650 KB file of 13000x13000
            # pixels took 780 MB to read), where a catalog rebuild reads 16 images at once.
            fields = json.loads(image.info[PROVENANCE_CHUNK])
            # A file cut short in its pixels (a copy broken off) has its provenance whole: its
            # image is not, and must be made again, not given a catalog row.
            image.verify()
    except (Image.DecompressionBombError, SyntaxError) as exc:  # no OSError: in the callers' own words
        raise ValueError(str(exc)) from None
    # Written before the checker was recorded: one it flagged was looked at by it.
    fields.setdefault("safety_checker", fields.get("safety_flagged", False))
    # A field this version does not know was written by a newer one, sharing the store (a rolling
    # upgrade): the image is sound, and its catalog row has the columns this version knows.
    return Provenance(**{name: value for name, value in fields.items() if name in _PROVENANCE_FIELDS})


def image_key_path(key: str) -> str:
    """Store key of an image: fanned out by the first two hex digits."""
    return f"images/{key[:2]}/{key}.png"

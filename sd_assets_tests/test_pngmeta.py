"""PNG text chunks: the AUTOMATIC1111 'parameters' line and the JSON provenance."""

import io
import json
import subprocess
import sys

import pytest
from PIL import Image, PngImagePlugin

from dataclasses import asdict, replace

from sd_assets.domain.pngmeta import Provenance, a1111_parameters, encode_png, read_provenance
from sd_assets_tests.helpers import claiming_size

PROVENANCE = Provenance(
    key="k" * 64, subject="alan turing", style="Banksy", image_index=0, prompt="alan turing by Banksy",
    negative_prompt="blurry", seed=1234, model_id="tiny-random", model_revision="0123456789abcdef" * 2 + "01234567",
    scheduler="PNDMScheduler", steps=4, guidance_scale=7.5, width=64, height=64, run_id="run-1",
    partition="Banksy", created="2026-11-27T00:00:00+00:00", device="cpu", dtype="float32",
)  # fmt: skip


def test_parameters_chunk_is_in_the_web_ui_format():
    text = a1111_parameters(PROVENANCE)
    assert text.splitlines() == [
        "alan turing by Banksy",
        "Negative prompt: blurry",
        "Steps: 4, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: tiny-random, "
        f"Model revision: {PROVENANCE.model_revision}",
    ]


@pytest.mark.parametrize(
    ("scheduler", "sampler"),
    [("PNDMScheduler", "PLMS"), ("DDIMScheduler", "DDIM"), ("EulerDiscreteScheduler", "Euler"),
     ("EulerAncestralDiscreteScheduler", "Euler a"), ("DPMSolverMultistepScheduler", "DPM++ 2M"),
     ("LMSDiscreteScheduler", "LMS"), ("SomeNewScheduler", "SomeNewScheduler")],
)  # fmt: skip
def test_parameters_chunk_names_the_sampler_as_the_web_ui_does(scheduler, sampler):
    assert f", Sampler: {sampler}, " in a1111_parameters(replace(PROVENANCE, scheduler=scheduler))


def test_parameters_chunk_has_no_negative_prompt_line_without_one():
    assert a1111_parameters(replace(PROVENANCE, negative_prompt="")).splitlines() == [
        "alan turing by Banksy",
        "Steps: 4, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: tiny-random, "
        f"Model revision: {PROVENANCE.model_revision}",
    ]


def test_parameters_chunk_writes_a_whole_guidance_scale_as_the_web_ui_does_and_says_when_the_checker_looked():
    # The web UI writes "CFG scale: 7" for 7.0, and tools that read the line compare it as text.
    assert ", CFG scale: 7, Seed: 1234, " in a1111_parameters(replace(PROVENANCE, guidance_scale=7.0))
    checked = a1111_parameters(replace(PROVENANCE, safety_checker=True, deep_cache="interval 3, branch 0"))
    assert checked.splitlines()[-1].endswith(
        f", Model revision: {PROVENANCE.model_revision}, DeepCache: interval 3; branch 0, Safety checker: on"
    )
    assert "Safety checker" not in a1111_parameters(PROVENANCE)


def test_png_carries_both_chunks_and_round_trips():
    data = encode_png(Image.new("RGB", (64, 64), (200, 10, 10)), PROVENANCE)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 64)
        assert image.getpixel((3, 3)) == (200, 10, 10)
        assert image.text["parameters"].startswith("alan turing by Banksy\n")
        assert json.loads(image.text["sd-assets"])["seed"] == 1234
    assert read_provenance(data) == PROVENANCE


def test_deep_cache_is_in_both_chunks_and_pngs_from_before_it_still_read():
    cached = replace(PROVENANCE, deep_cache="interval 3, branch 0")
    revision = PROVENANCE.model_revision
    assert a1111_parameters(cached).endswith(f", Model revision: {revision}, DeepCache: interval 3; branch 0")
    assert read_provenance(encode_png(Image.new("RGB", (8, 8)), cached)).deep_cache == "interval 3, branch 0"
    # A PNG written before the field existed has no deep_cache in its JSON.
    old_json = {k: v for k, v in asdict(PROVENANCE).items() if k != "deep_cache"}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-assets", json.dumps(old_json))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    assert read_provenance(buffer.getvalue()) == PROVENANCE


def test_subjects_in_any_script_come_back_from_the_png_as_written():
    written = replace(PROVENANCE, subject="café 北斎", prompt="café 北斎 by Banksy", negative_prompt="ぼやけた")
    data = encode_png(Image.new("RGB", (8, 8)), written)
    with Image.open(io.BytesIO(data)) as image:
        assert image.text["parameters"].splitlines()[:2] == ["café 北斎 by Banksy", "Negative prompt: ぼやけた"]
    assert read_provenance(data) == written


def test_a_png_from_before_the_safety_checker_was_recorded_says_it_checked_the_images_it_flagged():
    def old_png(provenance: Provenance) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-assets", json.dumps({k: v for k, v in asdict(provenance).items() if k != "safety_checker"}))
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    flagged = read_provenance(old_png(replace(PROVENANCE, safety_flagged=True)))
    assert (flagged.safety_flagged, flagged.safety_checker) == (True, True)
    assert read_provenance(old_png(PROVENANCE)).safety_checker is False, "unflagged: it cannot tell"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_provenance_is_read_without_decoding_the_pixels_and_a_decompression_bomb_is_refused(tmp_path):
    png = encode_png(Image.new("RGB", (8, 8)), PROVENANCE)
    # A catalog rebuild reads 16 images at once: one of 13000x13000 pixels took 676 MB to decode.
    # This one, of 8000x8000 grey pixels, 64 MB (in a 64 KB file).
    huge = tmp_path / "huge.png"
    huge.write_bytes(encode_png(Image.new("L", (8000, 8000)), PROVENANCE))
    # The process's peak resident memory (VmHWM, kB; ru_maxrss would count the forking pytest's).
    probe = (
        "import re, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from sd_assets.domain.pngmeta import read_provenance\n"
        "def peak():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = peak()\n"
        "print(read_provenance(data).key)\n"
        "print(peak() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True, check=True)
    key, grown_kb = done.stdout.split()
    assert key == PROVENANCE.key and int(grown_kb) < 16_000, f"{int(grown_kb) // 1000} MB more to read it"
    # Past what Pillow opens: a ValueError, as other files that are not the project's PNGs, not Pillow's own error.
    with pytest.raises(ValueError, match=r"Image size \(400000000 pixels\) exceeds limit"):
        read_provenance(claiming_size(png, 20000, 20000))

def test_a_png_cut_short_or_damaged_in_its_pixels_has_no_provenance_to_read():
    # Its text chunks come first and are whole: the image is not, and is made again, not catalogued.
    png = encode_png(Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12), PROVENANCE)
    with pytest.raises(OSError, match="runcated"):
        read_provenance(png[:-40])
    damaged = bytearray(png)
    damaged[-30] ^= 0xFF  # a byte of the pixels' chunk
    with pytest.raises(ValueError, match="broken PNG file"):
        read_provenance(bytes(damaged))
    assert read_provenance(png) == PROVENANCE

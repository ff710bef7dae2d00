"""The grid file: what loads, and the errors a user gets for what does not."""

import tracemalloc
from pathlib import Path

import pytest

from sd_assets.domain.errors import GridError
from sd_assets.domain.grid import load_grid, parse_subject_list, slugify, unique_subjects
from sd_assets.domain.store import LocalStore
from sd_assets.domain.subject_lists import FolderSource, read_subject_lists, subject_source
from sd_assets_tests.helpers import write_grid

REPO = Path(__file__).resolve().parent.parent


def test_demo_grid_loads_with_paths_relative_to_the_file():
    grid = load_grid(REPO / "grid.yaml")
    assert grid.styles[0] == "Banksy" and len(grid.styles) == 6
    assert grid.subjects_dir == REPO / "subjects"
    assert grid.storage == str(REPO / "data")
    assert grid.images_per_prompt == 2 and grid.seed == 42
    assert grid.model.id == "tiny-random" and grid.inference.batch_size == 4
    assert grid.prompt("alan turing", "Banksy") == "alan turing by Banksy"


def test_sd15_example_grid_loads():
    grid = load_grid(REPO / "examples" / "grid-sd15.yaml")
    assert grid.inference.width == 512 and grid.inference.steps == 50
    assert grid.model.id == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _error_for(tmp_path, text: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as caught:
        load_grid(path)
    message = str(caught.value)
    assert str(path) in message, "the error names the file"
    return message


VALID = """\
styles: [Banksy]
subjects_dir: subjects
model: {id: tiny-random}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID.replace("styles: [Banksy]\n", ""), "missing field 'styles'"),
        (VALID + "colour: red\n", "unknown field 'colour'"),
        (VALID + "source: /etc\n", "unknown field 'source'"),
        (VALID + "inference: {stepz: 3}\n", "unknown field 'inference.stepz'; did you mean 'inference.steps'?"),
        (VALID + "image_per_prompt: 2\n", "unknown field 'image_per_prompt'; did you mean 'images_per_prompt'?"),
        (VALID + "steps: 4\n", "unknown field 'steps'; it belongs in another section: 'inference.steps'"),
        (VALID.replace("tiny-random}", "tiny-random, dtype: float16}"),
         "unknown field 'model.dtype'; it belongs in another section: 'inference.dtype'"),  # fmt: skip
        (VALID + "inference: {sampler: euler}\n",
         "unknown field 'inference.sampler'; 'inference' takes steps, guidance_scale, width, height, negative_prompt, "
         "batch_size, scheduler, dtype,"),  # fmt: skip
        (VALID.replace("[Banksy]", "[]"), "field 'styles' = []: needs at least one style"),
        (VALID.replace("[Banksy]", "[Banksy, Banksy]"), "style 'Banksy' is given twice; keep one"),
        (VALID.replace("[Banksy]", "[Andy Warhol, andy-warhol]"), "duplicates 'Andy Warhol'"),
        (VALID.replace("[Banksy]", '["a/b"]'), "style 'a/b' may hold only"),
        (VALID.replace("[Banksy]", '["bad...dots, ok"]'), "may hold only"),
        (VALID.replace("[Banksy]", '["Dots..."]'),
         "field 'styles' = ['Dots...']: style 'Dots...' holds '...', which a partition key may not; write it otherwise"),
        (VALID.replace("[Banksy]", '[" padded"]'), "may hold only"),
        (VALID.replace("[Banksy]", '["Banksy\\n"]'), "field 'styles' = ['Banksy\\n']: style 'Banksy\\n' may hold only"),
        # One folder, catalog and grid file on a file system that ignores case (macOS's, Windows').
        (VALID.replace("[Banksy]", "[Jesus, Jeſus]"),
         "style 'Jeſus' duplicates 'Jesus' (they file as 'jesus' and 'jeſus', one name where case is ignored)"),
        (VALID.replace("[Banksy]", "[Σας, Σασ]"), "style 'Σασ' duplicates 'Σας' (they file as 'σας' and 'σασ', "),
        (VALID + "inference: {steps: 0}\n", "field 'inference.steps' = 0"),
        (VALID + "inference: {width: 100}\n", "field 'inference.width' = 100"),
        (VALID + "inference: {height: 100}\n", "field 'inference.height' = 100"),
        (VALID + "inference: {batch_size: lots}\n", "field 'inference.batch_size' = 'lots': must be 'auto' or an integer"),
        (VALID + "inference: {batch_size: true}\n", "field 'inference.batch_size' = True: must be 'auto' or an integer"),
        (VALID + "inference: {steps: true}\n", "field 'inference.steps' = True: Input should be a valid integer"),
        # Left empty, YAML reads null: what to write, and whether the line may go.
        (VALID + "inference:\n",
         "field 'inference' is empty (YAML reads nothing as null): give its fields (steps, guidance_scale, "),
        (VALID + "inference:\n  negative_prompt:\n",
         "field 'inference.negative_prompt' is empty (YAML reads nothing as null): give it a value, or remove the "
         "line for its default"),
        (VALID.replace("subjects_dir: subjects", "subjects_dir:"),
         "field 'subjects_dir' is empty (YAML reads nothing as null): give it a value"),
        (VALID.replace("model: {id: tiny-random}", "model:"),
         "field 'model' is empty (YAML reads nothing as null): give its fields (id, revision, variant)"),
        (VALID + "inference: {deep_cache: true}\n",
         "field 'inference.deep_cache' = True: a section, not a value: give its fields (interval, branch), as "
         "{interval: ...}"),
        # Words and numbers YAML reads as other than text.
        (VALID.replace("[Banksy]", "[Banksy, No]"),
         "field 'styles.1' = False: Input should be a valid string; YAML reads it unquoted as true or false (yes, "
         "no, on and off too): put it in quotes"),
        (VALID.replace("[Banksy]", "[1984]"),
         "field 'styles.0' = 1984: Input should be a valid string; YAML reads it unquoted as a number: put it in "
         "quotes"),  # fmt: skip
        (VALID + 'inference: {width: "64"}\n',
         "field 'inference.width' = '64': Input should be a valid integer; in quotes it is text: write 64 "
         "without them"),  # fmt: skip
        # YAML 1.1, which PyYAML reads, takes a number without a '.' before its exponent for text.
        (VALID + "inference: {guidance_scale: 1e1}\n",
         "field 'inference.guidance_scale' = '1e1': Input should be a valid number; YAML reads 1e1 as text, not a "
         "number: write 10.0"),
        (VALID + "seed: 1e3\n", "field 'seed' = '1e3': Input should be a valid integer; YAML reads 1e3 as text, not a "
         "number: write 1000"),
        # A hint YAML reads as a number: a '.' in the mantissa.
        (VALID + "inference: {guidance_scale: 1e-5}\n", "YAML reads 1e-5 as text, not a number: write 1.0e-05"),
        (VALID + 'storage: "da\\0ta"\n',
         "field 'storage' = 'da\\x00ta': holds a NUL character (\\0), which no path can"),  # fmt: skip
        (VALID.replace("subjects_dir: subjects", 'subjects_dir: "sub\\0jects"'),
         "field 'subjects_dir' = 'sub\\x00jects': holds a NUL character"),
        (VALID + "inference: {guidance_scale: .nan}\n", "field 'inference.guidance_scale' = nan: Input should be a finite"),
        (VALID + "inference: {guidance_scale: true}\n", "field 'inference.guidance_scale' = True: Input should be a"),
        (VALID + "inference: {scheduler: EulerDiscrete}\n",
         "field 'inference.scheduler' = 'EulerDiscrete': must be a diffusers scheduler class name; did you mean "
         "EulerDiscreteScheduler?"),  # fmt: skip
        (VALID + "inference: {scheduler: eulerdiscretescheduler}\n", "did you mean EulerDiscreteScheduler?"),
        (VALID + "inference: {scheduler: Euler_Discrete}\n", "did you mean EulerDiscreteScheduler?"),
        (VALID + "inference: {scheduler: Foo}\n",
         "field 'inference.scheduler' = 'Foo': must be a diffusers scheduler class name, such as"),  # fmt: skip
        # The web UI's sampler names, as people copy them from a PNG's parameters or their notes.
        (VALID + "inference: {scheduler: Euler a}\n",
         "field 'inference.scheduler' = 'Euler a': the web UI's name; diffusers' class is "
         "EulerAncestralDiscreteScheduler"),  # fmt: skip
        (VALID + "inference: {scheduler: euler_a}\n", "diffusers' class is EulerAncestralDiscreteScheduler"),
        (VALID + "inference: {scheduler: DDIM}\n", "'DDIM': the web UI's name; diffusers' class is DDIMScheduler"),
        (VALID + "inference: {scheduler: DPM++ 2M Karras}\n",
         "the web UI's name; diffusers' class is DPMSolverMultistepScheduler (without Karras sigmas, which the "
         "grid has no setting for)"),  # fmt: skip
        (VALID + "inference: {compile: 1}\n", "field 'inference.compile' = 1: Input should be a valid boolean"),
        (VALID + "inference: {compile_vae: true}\n", "field 'inference.compile_vae' = True: needs compile: true"),
        (VALID + "inference: {deep_cache: {interval: 1}}\n", "field 'inference.deep_cache.interval' = 1"),
        (VALID + "inference: {deep_cache: {branch: 2}}\n", "missing field 'inference.deep_cache.interval'"),
        (VALID + "inference: {deep_cache: {interval: 3, branch: -1}}\n", "field 'inference.deep_cache.branch' = -1"),
        (VALID + "inference: {deep_cache: {interval: 3, layer: 0}}\n",
         "unknown field 'inference.deep_cache.layer'; 'inference.deep_cache' takes interval, branch"),  # fmt: skip
        (VALID + 'prompt_template: "{style} only"\n', "must contain {subject}"),
        (VALID + "prompt_template: {subject} by {style}\n",
         "line 4, column 28: not valid YAML: expected <block end>, but found '<scalar>' (while parsing a block "
         "mapping that starts at line 1); a value starting with '{' is a mapping to YAML: put it in quotes "
         '(prompt_template: "{subject} by {style}")'),  # fmt: skip
        (
            VALID + 'prompt_template: "{subject}, oil painting"\n',
            "field 'prompt_template' = '{subject}, oil painting': '{subject}, oil painting' must contain {style}",
        ),
        (VALID + 'prompt_template: "{subject} in {city}"\n', "unknown fields ['city']"),
        (VALID + 'prompt_template: "{subject!r} by {style}"\n', "without a format spec or '!' conversion"),
        (VALID + 'prompt_template: "{subject:>999} by {style}"\n', "without a format spec or '!' conversion"),
        (VALID.replace("id: tiny-random", 'id: "not a repo!!"'), "field 'model.id' = 'not a repo!!'"),
        ("styles: [Banksy\n", "grid.yaml, line 2, column 1: not valid YAML: expected ',' or ']', but got "
         "'<stream end>' (while parsing a flow sequence that starts at line 1)"),  # fmt: skip
        ("styles: [Banksy]\n\tseed: 4\n", "grid.yaml, line 2, column 1: not valid YAML: found character '\\t'"),
        (VALID + "seed: 7\nseed: 42\n", "not valid YAML: field 'seed' is given twice (first at line "),
        ("styles: [Banksy]\nseed: 4\x01\n", "grid.yaml, line 2, column 8: not valid YAML: the character U+0001 is not"),
        ("a: &x 1\nb: &x 2\n", "grid.yaml, line 2, column 4: not valid YAML: second occurrence (found duplicate "
         "anchor 'x'; first occurrence at line 1)"),  # fmt: skip
        (VALID + "inference: {steps: 2, steps: 3}\n", "field 'steps' is given twice"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_grid_files_name_the_field_and_value(tmp_path, text, expected):
    message = _error_for(tmp_path, text)
    assert expected in message
    assert "\n" not in message and "<unicode string>" not in message, "one line, naming the file"


def test_a_grid_of_nested_yaml_anchors_is_refused_in_a_message_of_a_few_lines(tmp_path):
    # 8 levels of 10: 450 bytes standing for a list of 10^8 items, which the message once spelt out.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 8)]
    grid = "\n".join(levels) + "\n" + VALID.replace("[Banksy]", "[*a7]")
    message = _error_for(tmp_path, grid)
    [line] = [line for line in message.splitlines() if "field 'styles.0'" in line]
    assert f"{tmp_path / 'grid.yaml'}: field 'styles.0' = [[[...], [...], [...], [...], [...], [...], ...], " in line
    assert line.endswith(", ...]: Input should be a valid string") and len(line) < 1000


def test_no_number_is_hinted_where_it_is_not_one_to_write(tmp_path):
    # 1e30 as an integer has rounded in a float; .inf is a word YAML has, and no field takes it.
    for text in ("seed: 1e30\n", 'inference: {guidance_scale: "inf"}\n'):
        assert _error_for(tmp_path, VALID + text).endswith(("Input should be a valid integer", "Input should be a valid number"))


def test_a_grid_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_bytes(b"styles: [Banksy]\nseed: \xff\n")
    with pytest.raises(GridError) as caught:
        load_grid(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (line 2, byte 23): invalid start byte; save it as UTF-8"


def test_a_grid_saved_as_utf16_as_windows_powershell_writes_it_reads_as_its_utf8_twin(tmp_path):
    text = VALID.replace("styles: [Banksy]", 'styles: ["Katsushika Hokusai \u845b\u98fe", "Frida Kahlo"]')
    (tmp_path / "utf8").mkdir()
    (tmp_path / "utf8" / "grid.yaml").write_bytes(text.encode())
    expected = load_grid(tmp_path / "utf8" / "grid.yaml")
    for encoding in ("utf-16", "utf-16-be", "utf-8-sig"):
        path = tmp_path / encoding / "grid.yaml"
        path.parent.mkdir()
        mark = b"\xfe\xff" if encoding == "utf-16-be" else b""  # "utf-16" writes its own, little-endian
        path.write_bytes(mark + text.replace("\n", "\r\n").encode(encoding))
        grid = load_grid(path)
        assert grid.styles == expected.styles == ["Katsushika Hokusai \u845b\u98fe", "Frida Kahlo"]
        assert grid.model == expected.model and grid.subjects_dir == path.parent / "subjects"


def test_a_grid_that_starts_as_utf16_and_is_not_names_the_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_bytes(VALID.encode("utf-16") + b"x")
    with pytest.raises(GridError) as caught:
        load_grid(path)
    assert str(caught.value) == f"{path}: starts as UTF-16 text but is not (byte 132): truncated data; save it as UTF-8"


def test_a_style_with_a_combining_accent_is_the_same_as_its_composed_form(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(VALID.replace("styles: [Banksy]", 'styles: ["E\u0301douard Manet", Banksy]'))
    assert load_grid(path).styles == ["\u00c9douard Manet", "Banksy"]


def test_a_style_not_in_the_grid_names_the_one_it_likely_meant(tmp_path):
    styles = ("Banksy", "Andy Warhol", "Vincent Van Gogh", "Pablo Picasso", "Émile Bernard")
    grid = load_grid(write_grid(tmp_path, styles=styles))
    assert grid.require_style("Andy Warhol") == "Andy Warhol"
    assert grid.require_style("E\u0301mile Bernard") == "Émile Bernard"  # an accent typed as a separate mark
    meant = {"andy-warhol": "Andy Warhol", "warhol": "Andy Warhol", "Andy Warhal": "Andy Warhol",
             "VAN GOGH": "Vincent Van Gogh", "vincent van gohg": "Vincent Van Gogh", "banksy ": "Banksy",
             "emile": "Émile Bernard",
             # A style renamed shorter: its old name has words more ('Banksy' was 'Banksy the Elder').
             "Banksy the Elder": "Banksy", "Pablo Ruiz Picasso": "Pablo Picasso"}  # fmt: skip
    for typed, style in meant.items():
        with pytest.raises(GridError) as raised:
            grid.require_style(typed)
        assert str(raised.value) == f"unknown style {typed!r} (did you mean {style!r}?); the grid {grid.source} has " \
            f"{list(styles)}"
    # Nothing alike, or a part of more than one style: no guess.
    for typed in ("Claude Monet", "o", "-", "Andy Warhol and Banksy"):
        with pytest.raises(GridError, match=rf"^unknown style '{typed}'; the grid "):
            grid.require_style(typed)


def test_compile_vae_comes_with_compile(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(VALID + "inference: {compile: true, compile_vae: true}\n")
    inference = load_grid(path).inference
    assert inference.compile and inference.compile_vae


def test_missing_grid_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(GridError, match="SD_ASSETS_GRID"):
        load_grid(tmp_path / "nope.yaml")


def test_subject_lists_skip_blank_lines_and_comments():
    parsed = parse_subject_list("people.txt", b"# heading\nalan turing\n\n  ada lovelace  \n#x\n   # indented note\n")
    assert parsed.subjects == ("alan turing", "ada lovelace")
    # A list saved with a byte-order mark (Windows Notepad) gives the same subjects, not "\ufeffalan turing".
    assert parse_subject_list("bom.txt", b"\xef\xbb\xbfalan turing\r\n").subjects == ("alan turing",)
    assert len(parsed.sha256) == 64


def test_zero_width_characters_pasted_from_a_web_page_make_no_subject_of_their_own():
    text = "alan turing\n\u200b\n\u200bada lovelace\u200d \n \ufeff\u2060 \nchar\u200dlie\n"
    parsed = parse_subject_list("pasted.txt", text.encode())
    # The blank-looking line is blank; one at the end of a name no longer makes a second "ada lovelace".
    assert parsed.subjects == ("alan turing", "ada lovelace", "char\u200dlie")


def test_a_subject_is_one_editor_line_whatever_its_accents_are_made_of():
    # A form feed (a page break in old text files) and U+2028 (pasted from a web page) do not end
    # a line in an editor, and do not end a subject here: line numbers are the editor's too.
    text = "\falan turing\nada\u2028lovelace\r\ngrace hopper\x1c\rcaf\u00e9 by night\ncafe\u0301 by night\n"
    text += "x" * 501 + "\nada  \t lovelace\n\u200b \u200bx \u200b\n"
    parsed = parse_subject_list("pasted.txt", text.encode())
    # What CLIP's tokenizer reads alike is one subject: "café" typed as one character or as "e" and
    # a combining accent; a run of spaces, tabs or other separators inside a line, as one space.
    subjects = ["alan turing", "ada lovelace", "grace hopper", "caf\u00e9 by night", "x"]
    assert parsed.subjects == (*subjects[:4], "caf\u00e9 by night", "ada lovelace", "x")
    assert unique_subjects([parsed]) == subjects
    assert parsed.skipped_lines == ("line 6: 501 characters, over the 500 a subject has",)


def test_a_list_saved_as_utf16_as_windows_notepad_saves_unicode_is_read():
    text = "alan turing\r\ncaf\u00e9 by night\r\n\u845b\u98fe \u5317\u658e\r\n"
    marks = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b"", "utf-32-be": b"\x00\x00\xfe\xff"}
    for encoding, mark in marks.items():  # the byte-order mark first, little-endian or big
        data = mark + text.encode(encoding)
        parsed = parse_subject_list("notepad.txt", data)
        assert parsed.subjects == ("alan turing", "caf\u00e9 by night", "\u845b\u98fe \u5317\u658e")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00\x01binary", "binary content"),
        # UTF-16's byte-order mark, then an odd byte out.
        ("ok\n".encode("utf-16") + b"x", r"starts as UTF-16 text but is not \(byte 8\): truncated data; save it as"),
        (b"ok\ncaf\xe9\n", r"not UTF-8 text \(line 2, byte 6\): invalid continuation byte; save it as UTF-8"),
        (b"# only a comment\n\n", r"no subjects \(only blank lines or '#' comments\)"),
        (b"", r"no subjects \(the file is empty\)"),
        ("".encode("utf-16"), r"no subjects \(the file is empty\)"),  # Notepad's "Unicode": its byte-order mark
        (b"\n \n", r"no subjects \(only blank lines or '#' comments\)"),
        (b"x" * 501 + b"\n", r"no subjects \(line 1: 501 characters, over the 500 a subject has\)"),
    ],
)
def test_malformed_subject_lists_are_refused_with_the_reason(data, expected):
    with pytest.raises(GridError, match=expected):
        parse_subject_list("bad.txt", data)


def test_a_line_over_the_length_a_subject_has_is_skipped_and_the_rest_of_the_list_stands():
    parsed = parse_subject_list("people.txt", b"alan turing\n" + b"x" * 501 + b"\nada lovelace\n")
    assert parsed.subjects == ("alan turing", "ada lovelace")
    assert parsed.skipped_lines == ("line 2: 501 characters, over the 500 a subject has",)
    many = parse_subject_list("people.txt", b"alan turing\n" + (b"x" * 501 + b"\n") * 7)
    assert len(many.skipped_lines) == 6 and many.skipped_lines[-1] == "2 more lines like these"


def test_subject_cap_is_enforced():
    with pytest.raises(GridError, match="3 subjects, more than max_subjects_per_list=2"):
        parse_subject_list("many.txt", b"a\nb\nc\n", max_subjects=2)


def test_a_list_far_over_the_subject_cap_is_refused_in_little_more_memory_than_its_text():
    # A sensor reads every list that changes: one of 48 MB took 600 MB to refuse.
    data = b"".join(b"subject %d\n" % n for n in range(300_000)) + (b"x" * 501 + b"\n") * 10_000
    tracemalloc.start()
    try:
        with pytest.raises(GridError) as refused:
            parse_subject_list("huge.txt", data, max_subjects=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(refused.value) == "subject list huge.txt: 300000 subjects, more than max_subjects_per_list=10"
    assert peak < 1.5 * len(data), f"{peak / 1e6:.0f} MB to read {len(data) / 1e6:.0f} MB"


def test_a_subject_in_two_lists_is_made_once():
    first = parse_subject_list("a.txt", b"alan turing\nada lovelace\n")
    second = parse_subject_list("b.txt", b"ada lovelace\ngrace hopper\n")
    assert unique_subjects([first, second]) == ["alan turing", "ada lovelace", "grace hopper"]


def test_slugs_are_file_safe():
    assert slugify("Jean-Michel Basquiat") == "jean-michel-basquiat"
    assert slugify("Frida Kahlo") == "frida-kahlo"
    # Runs of other characters are one '-', none at either end; letters of any script are kept.
    assert slugify("Tom & Jerry") == "tom-jerry" and slugify("Gustav Klimt.") == "gustav-klimt"
    assert slugify("Édouard Manet") == "édouard-manet" and slugify("葛飾 北斎") == "葛飾-北斎"


def test_written_grid_helper_round_trips(tmp_path):
    grid = load_grid(write_grid(tmp_path, styles=("Banksy", "Frida Kahlo")))
    assert grid.styles == ["Banksy", "Frida Kahlo"]


def test_a_subjects_folder_without_lists_is_a_clear_error(tmp_path):
    (tmp_path / "subjects").mkdir()
    (tmp_path / "subjects" / "notes.md").write_text("not a list")
    with pytest.raises(GridError, match=rf"no valid subject lists in {tmp_path / 'subjects'} \(no \*\.txt files\)$"):
        read_subject_lists(FolderSource(tmp_path / "subjects"), 100)


def test_a_subjects_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "subjects.txt").write_text("alan turing\n")
    with pytest.raises(GridError, match=r"subject lists folder .*subjects\.txt is a file \(the grid's 'subjects_dir'"):
        read_subject_lists(FolderSource(tmp_path / "subjects.txt"), 100)


def test_a_subjects_dir_that_does_not_exist_names_the_grid_file_it_comes_from(tmp_path):
    grid_file = write_grid(tmp_path, extra="")
    grid_file.write_text(grid_file.read_text().replace("subjects_dir: subjects", "subjects_dir: lists"))
    source = subject_source(load_grid(grid_file), LocalStore(tmp_path / "data"))
    with pytest.raises(GridError) as error:
        read_subject_lists(source, 100)
    assert str(error.value) == f"subject lists folder {tmp_path / 'lists'} does not exist ('subjects_dir' in {grid_file})"


def test_a_grid_file_that_cannot_be_read_is_one_line_naming_it():
    # A file whose every read fails, even for root (who reads past any permission).
    with pytest.raises(GridError, match=r"^cannot read grid file /proc/\d+/mem: Input/output error$"):
        load_grid("/proc/self/mem")


def test_a_grid_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(GridError, match=rf"grid file {tmp_path} is a folder \(set SD_ASSETS_GRID to a grid.yaml"):
        load_grid(tmp_path)


def test_a_home_folder_in_the_grids_paths_is_the_users_not_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    grid = tmp_path / "grid.yaml"
    grid.write_text("styles: [Banksy]\nsubjects_dir: ~/subjects\nmodel: {id: tiny-random}\nstorage: ~/sd-data\n")
    loaded = load_grid(grid)
    assert loaded.subjects_dir == tmp_path / "home" / "subjects"
    assert loaded.storage == str(tmp_path / "home" / "sd-data")
    # Another user's home, as the shell reads it; one this machine does not know, by field.
    grid.write_text("styles: [Banksy]\nsubjects_dir: ~root/subjects\nmodel: {id: tiny-random}\n")
    assert load_grid(grid).subjects_dir == Path("~root").expanduser() / "subjects"
    grid.write_text("styles: [Banksy]\nsubjects_dir: s\nmodel: {id: tiny-random}\nstorage: ~no-such-user-x/d\n")
    with pytest.raises(GridError, match=r"grid.yaml: field 'storage' = '~no-such-user-x/d': no home folder for "
                       r"'~no-such-user-x' on this machine$"):  # fmt: skip
        load_grid(grid)

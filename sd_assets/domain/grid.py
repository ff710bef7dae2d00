"""The grid file: what to generate (styles x subjects x images), with which model and settings.

Owns parsing and validating ``grid.yaml`` once, at the edge, and reading the subject lists it
points to. Every error names the file, the field and the bad value.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import reprlib
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import yaml

from sd_assets.domain.errors import GridError, StoreError, unknown_home
from sd_assets.domain.schedulers import class_spelt_otherwise, web_ui_name
from sd_assets.domain.store import check_storage_url

# Style names become Dagster partition keys, URL segments and file names (through their slug);
# letters, digits, spaces and a little punctuation are safe in all three.
_STYLE_PATTERN = re.compile(r"[^\W_](?:[\w .'&+-]*[\w.'&+-])?")  # the whole name (fullmatch)
MAX_STYLE_LENGTH = 64
MAX_SUBJECT_LENGTH = 500
TINY_MODEL_ID = "tiny-random"
# A value as an error shows it, at most a line or two: YAML's anchors let a few hundred bytes of
# grid stand for a list of a hundred million items.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 200, 200
_REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def slugify(name: str) -> str:
    """Lower-case file name for a style, runs of other characters as one '-': 'Jean-Michel Basquiat' ->
    'jean-michel-basquiat'; letters of other scripts are kept ('葛飾 北斎' -> '葛飾-北斎')."""
    slug = re.sub(r"[^\w]+", "-", name.lower(), flags=re.UNICODE).strip("-")
    return slug


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


# Numbers and switches as YAML writes them: `steps: true` or `width: "64"` is a mistake, not 1 or 64.
_Int = Annotated[int, pydantic.Strict()]
_Bool = Annotated[bool, pydantic.Strict()]


class ModelConfig(_Strict):
    id: Annotated[str, pydantic.StringConstraints(min_length=1, strip_whitespace=True)]
    revision: Annotated[str, pydantic.StringConstraints(min_length=1, strip_whitespace=True)] = "main"
    variant: Literal["fp16", "auto", "none"] = "auto"

    @pydantic.field_validator("id")
    @classmethod
    def _valid_id(cls, model_id: str) -> str:
        # The hub's own rule, checked here so that a typo fails before any run, naming the field.
        if not _REPO_ID_PATTERN.match(model_id) or len(model_id) > 96 or ".." in model_id or "--" in model_id:
            raise ValueError(
                f"not a Hugging Face repo id: use '{TINY_MODEL_ID}' or 'org/name' (letters, digits, '-', '_', '.'; "
                "at most 96 characters)"
            )
        return model_id

    @property
    def is_tiny(self) -> bool:
        return self.id == TINY_MODEL_ID


class DeepCacheConfig(_Strict):
    # Run the whole UNet every `interval` steps; between them only the layers above skip branch
    # `branch` (0 = the shallowest). Changes the pictures (see docs/PERFORMANCE.md).
    interval: Annotated[_Int, pydantic.Field(ge=2, le=100)]
    branch: Annotated[_Int, pydantic.Field(ge=0)] = 0


class InferenceConfig(_Strict):
    steps: Annotated[_Int, pydantic.Field(ge=1, le=1000)] = 50
    guidance_scale: Annotated[float, pydantic.Strict(), pydantic.Field(ge=0.0, le=50.0, allow_inf_nan=False)] = 7.5
    width: Annotated[_Int, pydantic.Field(ge=8, le=4096, multiple_of=8)] = 512
    height: Annotated[_Int, pydantic.Field(ge=8, le=4096, multiple_of=8)] = 512
    negative_prompt: str = ""
    batch_size: int | Literal["auto"] = "auto"
    scheduler: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    compile: _Bool = False
    # Also compile the VAE decoder: on an H200 it took 10 ms an image off the decode and about
    # 35 s more compiling per process (docs/PERFORMANCE.md), so it pays only on long runs.
    compile_vae: _Bool = False
    safety_checker: _Bool = False
    # DeepCache: reuse the UNet's deep features between steps. Off unless set; it changes the
    # pictures, so it is part of each image's content key and provenance.
    deep_cache: DeepCacheConfig | None = None

    @pydantic.field_validator("scheduler")
    @classmethod
    def _scheduler_class_name(cls, value: str | None) -> str | None:
        # The names themselves are checked when diffusers loads (importing it here would cost
        # every run, even one with nothing to make, about two seconds); the shape is checked now.
        if value is not None and not (value.isidentifier() and value.endswith("Scheduler")):
            web_ui = web_ui_name(value)
            if web_ui:
                raise ValueError(web_ui)
            suffixed = class_spelt_otherwise(value)
            hint = f"; did you mean {suffixed}?" if suffixed else ", such as EulerDiscreteScheduler or DDIMScheduler"
            raise ValueError(f"must be a diffusers scheduler class name{hint}")
        return value

    @pydantic.field_validator("compile_vae")
    @classmethod
    def _vae_with_unet(cls, value: bool, info: pydantic.ValidationInfo) -> bool:
        if value and not info.data.get("compile"):
            raise ValueError("needs compile: true (the VAE decoder is compiled along with the UNet)")
        return value

    @pydantic.field_validator("batch_size", mode="before")
    @classmethod
    def _auto_or_batch(cls, value: object) -> object:
        # Before the union's own checks, which would report one error per member.
        if value == "auto" or (type(value) is int and 1 <= value <= 256):
            return value
        raise ValueError("must be 'auto' or an integer from 1 to 256")


class GridConfig(_Strict):
    styles: list[str]
    subjects_dir: Path
    prompt_template: str = "{subject} by {style}"
    images_per_prompt: Annotated[_Int, pydantic.Field(ge=1, le=1000)] = 1
    seed: Annotated[_Int, pydantic.Field(ge=0, le=2**63 - 1)] = 0
    model: ModelConfig
    inference: InferenceConfig = InferenceConfig()
    storage: str = "data"
    max_subjects_per_list: Annotated[_Int, pydantic.Field(ge=1)] = 10_000
    # Where the grid was read from: set by load_grid, not a field a file can name.
    _source: Path | None = pydantic.PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @pydantic.field_validator("subjects_dir", "storage", mode="before")
    @classmethod
    def _no_nul_in_paths(cls, value):
        # Every file system call would refuse it with a bare "embedded null byte", from deep in a run.
        if isinstance(value, str) and "\0" in value:
            raise ValueError("holds a NUL character (\\0), which no path can")
        return value

    @pydantic.field_validator("styles")
    @classmethod
    def _valid_styles(cls, styles: list[str]) -> list[str]:
        if not styles:
            raise ValueError("needs at least one style")
        # An accent typed as its own combining mark is the same name, and the pattern takes only its composed form.
        styles = [unicodedata.normalize("NFC", style) for style in styles]
        seen: dict[str, str] = {}
        for style in styles:
            if len(style) > MAX_STYLE_LENGTH:
                raise ValueError(f"style {style!r} is longer than {MAX_STYLE_LENGTH} characters")
            if not _STYLE_PATTERN.fullmatch(style):  # not match's '$', which a line end passes
                raise ValueError(
                    f"style {style!r} may hold only letters, digits, spaces and . ' & + - "
                    "(it becomes a partition key and a file name), and must start and end "
                    "with a letter, digit or punctuation mark other than a space"
                )
            if "..." in style:  # Dagster refuses it in a partition key, with a traceback that names no file
                raise ValueError(f"style {style!r} holds '...', which a partition key may not; write it otherwise")
            slug = slugify(style)
            # Compared as a file system that ignores case compares them (macOS's, Windows'):
            # 'Jeſus' and 'Jesus' would share one gallery folder, catalog and grid file there.
            folded = unicodedata.normalize("NFC", slug.casefold())
            if folded in seen and seen[folded] == style:
                raise ValueError(f"style {style!r} is given twice; keep one")
            if folded in seen:
                other = seen[folded]
                files = (f"both file as {slug!r}" if slugify(other) == slug else
                         f"they file as {slugify(other)!r} and {slug!r}, one name where case is ignored")  # fmt: skip
                raise ValueError(f"style {style!r} duplicates {other!r} ({files})")
            seen[folded] = style
        return styles

    @pydantic.field_validator("prompt_template")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        try:
            parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
        except ValueError as exc:
            raise ValueError(f"{template!r} is not a valid template: {exc}") from None
        fields = {name for name, _, _ in parts if name is not None}
        if any(spec or conversion for name, spec, conversion in parts if name is not None):
            # '{subject!r}' quotes every prompt, '{subject:>999}' pads it: the text goes in as written.
            raise ValueError(f"{template!r}: write {{subject}} and {{style}} without a format spec or '!' conversion")
        unknown = fields - {"subject", "style"}
        if unknown:
            raise ValueError(f"{template!r} uses unknown fields {sorted(unknown)}; use {{subject}} and {{style}}")
        if "subject" not in fields:
            raise ValueError(f"{template!r} must contain {{subject}}")
        if "style" not in fields:
            # Two styles (of this grid, or one that replaces it later) would make the same prompts,
            # so the same images under the same keys, each filed as the other's.
            raise ValueError(f"{template!r} must contain {{style}}: without it, styles make the same images")
        return template

    @pydantic.field_validator("storage")
    @classmethod
    def _valid_storage(cls, storage: str) -> str:
        if not storage.strip():
            raise ValueError("must be a folder or s3://bucket/prefix")
        return storage.strip()

    def prompt(self, subject: str, style: str) -> str:
        return self.prompt_template.format(subject=subject, style=style)

    def require_style(self, style: str) -> str:
        """``style`` as the grid writes it (in either Unicode form), else a GridError naming the
        style it likely meant."""
        composed = unicodedata.normalize("NFC", style)
        if composed not in self.styles:
            meant = self.likely_style(style)
            hint = f" (did you mean {meant!r}?)" if meant else ""
            raise GridError(f"unknown style {style!r}{hint}; the grid {self.source} has {self.styles}")
        return composed

    def likely_style(self, typed: str) -> str | None:
        """The style of the grid that ``typed`` likely meant, else None: by its slug, a part of its
        name, its name with words more, or its name misspelt ('andy-warhol', 'warhol', 'Frida Kahlo'
        for 'Frida', 'Andy Warhal'), accents optional."""
        slugs = {_unaccented_slug(style): style for style in self.styles}
        wanted = _unaccented_slug(typed)
        if not wanted:
            return None
        close = [slugs[wanted]] if wanted in slugs else [style for slug, style in slugs.items() if wanted in slug]
        if len(close) != 1:  # the other way: a style renamed shorter ('Frida Kahlo' -> 'Frida'), its whole words
            close = [style for slug, style in slugs.items() if f"-{slug}-" in f"-{wanted}-"]
        if len(close) != 1:
            close = [slugs[slug] for slug in difflib.get_close_matches(wanted, list(slugs), n=1, cutoff=0.75)]
        return close[0] if close else None


def _unaccented_slug(name: str) -> str:
    """A name's slug without its accents, to guess which style was meant ('emile' for 'Émile')."""
    return slugify(unaccented(name))


# The combining marks that accent letters (Unicode's Combining Diacritical Marks blocks): é, ö, ç, ǘ.
# Other scripts' marks tell letters apart and are kept: Japanese ハ/バ/パ, and Hangul's final
# consonants, recomposed (고 is not part of 공).
_ACCENTS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def unaccented(text: str) -> str:
    """``text`` case folded, without accents, in compatibility form (a ligature 'ﬁ' as 'fi', a
    full-width 'Ａ' as 'A'): as search compares parts of names, and a mistyped style is matched."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())  # folded first: 'İ' folds to 'i' and a dot
    return unicodedata.normalize("NFC", _ACCENTS.sub("", decomposed))


def _describe_location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


# The grid's sections and the fields each takes, for the hint an unknown field gets.
_SECTIONS: dict[tuple[str, ...], type[_Strict]] = {
    (): GridConfig,
    ("model",): ModelConfig,
    ("inference",): InferenceConfig,
    ("inference", "deep_cache"): DeepCacheConfig,
}


def _unknown_field_hint(loc: tuple) -> str:
    """What an unknown field at ``loc`` was likely meant to be: the same field in another section
    (``model.dtype`` for ``inference.dtype``), a field of its section spelt alike, else the fields
    its section takes. A bare "unknown field" leaves the user to look them up in the README."""
    *section, name = loc
    fields = _SECTIONS.get(tuple(section))
    if fields is None or not isinstance(name, str):
        return ""
    # Another section's field first: 'steps' at the top level is inference.steps, not a misspelt 'styles'.
    elsewhere = [where for where, other in _SECTIONS.items() if where != tuple(section) and name in other.model_fields]
    if elsewhere:
        return f"; it belongs in another section: '{_describe_location((*elsewhere[0], name))}'"
    known = list(fields.model_fields)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    if close:
        return f"; did you mean '{_describe_location((*section, close[0]))}'?"
    where = f"'{_describe_location(tuple(section))}'" if section else "the top level"
    return f"; {where} takes {', '.join(known)}"


def _field_default(loc: tuple) -> tuple[bool, type[_Strict] | None]:
    """Whether the field at ``loc`` has a default, and the section it is (None for a plain value)."""
    *section, name = loc
    fields = _SECTIONS.get(tuple(section))
    info = fields.model_fields.get(name) if fields is not None and isinstance(name, str) else None
    return (info is not None and not info.is_required()), _SECTIONS.get(tuple(loc))


def _empty_hint(loc: tuple) -> str:
    """What to write in a field left empty: a value (a section: its fields), or no line, where it has a default."""
    has_default, section = _field_default(loc)
    give = f": give its fields ({', '.join(section.model_fields)})" if section else ": give it a value"
    if not has_default:
        return give
    return f"{give}, or remove the line for {'the defaults' if section else 'its default'}"


def _value_hint(error) -> str:
    """A hint for a value YAML read as other than the user meant: a word or number meant as text
    (a style 'No' is false to YAML 1.1)."""
    value = error.get("input")
    if error["type"] == "string_type" and isinstance(value, (bool, int, float)):
        read_as = "true or false (yes, no, on and off too)" if isinstance(value, bool) else "a number"
        return f"; YAML reads it unquoted as {read_as}: put it in quotes"
    return ""


def _section_given_a_value(error) -> str:
    """What a section given a plain value (``deep_cache: true``) takes instead, or ''."""
    _has_default, section = _field_default(error["loc"])
    if section is None or error["type"] not in ("model_type", "dict_type"):
        return ""
    fields = list(section.model_fields)
    return f"a section, not a value: give its fields ({', '.join(fields)}), as {{{fields[0]}: ...}}"


# The byte-order marks UTF-32 and UTF-16 text start with (little- and big-endian), UTF-32's
# first: its little-endian mark begins as UTF-16's does.
_WIDE_TEXT_BOMS = {b"\xff\xfe\x00\x00": "utf-32", b"\x00\x00\xfe\xff": "utf-32",
                   b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}  # fmt: skip


def _decoded_text(data: bytes, what: str) -> str:
    """A text file's content: UTF-8 (with or without a byte-order mark), or UTF-16 or UTF-32 that
    starts with its mark (Windows Notepad's "Unicode", and what Windows PowerShell's ``>`` writes).

    Raises:
        GridError: naming ``what``: binary content (a NUL), or text in another encoding.
    """
    wide = next((encoding for bom, encoding in _WIDE_TEXT_BOMS.items() if data.startswith(bom)), None)
    if wide:
        try:
            text = data.decode(wide)
        except UnicodeDecodeError as exc:
            raise GridError(
                f"{what}: starts as {wide.upper()} text but is not (byte {exc.start}): {exc.reason}; save it as UTF-8"
            ) from None
        if "\0" in text:
            raise GridError(f"{what}: binary content (a NUL character); expected text")
        return text
    if b"\0" in data:
        raise GridError(f"{what}: binary content (a NUL byte); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise GridError(
            f"{what}: not UTF-8 text (line {line}, byte {exc.start}): {exc.reason}; save it as UTF-8"
        ) from None


def _number_as_text(error) -> str:
    """A hint for a number read as text: one in quotes, or one YAML 1.1 reads as a string (1e1 or
    1e3, without a '.' before the exponent); the field wants the number it looks like."""
    value = error.get("input")
    if not isinstance(value, str) or not error["type"].startswith(("int_", "float_")):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):  # .inf and .nan are YAML's own words, and no field takes them
        return ""
    if error["type"].startswith("int_"):
        if not number.is_integer() or abs(number) >= 2**53:  # beyond, the float has rounded the integer
            return ""
        written = str(int(number))
    else:
        # As YAML 1.1 reads a float: a '.' in the mantissa (Python's shortest form gives the exponent its sign).
        mantissa, e, exponent = repr(number).partition("e")
        written = f"{mantissa if '.' in mantissa else mantissa + '.0'}{e}{exponent}"
    if isinstance(yaml.safe_load(value), (int, float)):  # YAML would read it bare as a number: it was quoted
        return f"; in quotes it is text: write {written} without them"
    return f"; YAML reads {value} as text, not a number: write {written}"


def _quote_hint(exc: yaml.YAMLError, text: str) -> str:
    """A hint for the line a YAML error is on where its value holds {subject} or {style} and
    starts with '{': ``prompt_template: {subject} by {style}`` unquoted is a mapping to YAML."""
    mark = getattr(exc, "problem_mark", None)
    lines = text.splitlines()
    if mark is None or mark.line >= len(lines):
        return ""
    key, colon, value = lines[mark.line].partition(":")
    if not (colon and value.strip().startswith("{") and re.search(r"\{(subject|style)\}", value)):
        return ""
    quoted = f'{key.strip()}: "{value.strip()}"'
    return f"; a value starting with '{{' is a mapping to YAML: put it in quotes ({quoted})"


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error of ``text`` in one line: where in the file, then what (PyYAML's own message
    spans several lines and names its input '<unicode string>', not the file)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow; no mark
        before = text[: exc.position]
        line, column = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f", line {line}, column {column}: not valid YAML: the character U+{code:04X} is not allowed"
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ": not valid YAML: " + " ".join(str(exc).split())
    mark = exc.problem_mark
    where = f", line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {exc.problem}"
    if not exc.context or exc.context_mark is None:
        return where
    if exc.context.startswith("while "):  # "while parsing a flow sequence"
        return f"{where} ({exc.context} that starts at line {exc.context_mark.line + 1})"
    return f"{where} ({exc.context} at line {exc.context_mark.line + 1})"  # "first occurrence"


class _GridLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a field given twice in one mapping (plain PyYAML keeps the
    last silently: a second ``seed:`` further down would remake every image)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                given = key in first_line
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if given:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice (first at line {first_line[key]}); keep one",
                    key_node.start_mark,
                )  # fmt: skip
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _home_expanded(grid_file: Path, field: str, value: Path) -> Path:
    """``value`` with a leading '~' or '~user' as the shell reads it; a GridError for a user this
    machine does not know."""
    problem = unknown_home(value)
    if problem:
        raise GridError(f"{grid_file}: field '{field}' = {str(value)!r}: {problem}")
    return value.expanduser()


def load_grid(path: str | Path) -> GridConfig:
    """Read and validate a grid file; relative paths inside it are relative to the file.

    Raises:
        GridError: naming the file, the field and the bad value.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise GridError(f"grid file {path} is a folder (set SD_ASSETS_GRID to a grid.yaml, not its folder)")
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist (set SD_ASSETS_GRID to a grid.yaml)")
    try:
        data = path.read_bytes()
    except OSError as exc:  # no permission to read it, a disk or network file system failing
        raise GridError(f"cannot read grid file {path}: {exc.strerror or exc}") from None
    text = _decoded_text(data, str(path))
    try:
        raw = yaml.load(text, Loader=_GridLoader)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}{_yaml_problem(exc, text)}{_quote_hint(exc, text)}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping of fields at the top level, got {type(raw).__name__}")
    try:
        grid = GridConfig.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = _describe_location(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{path}: unknown field '{field}'{_unknown_field_hint(error['loc'])}")
            elif error["type"] == "missing":
                problems.append(f"{path}: missing field '{field}'")
            elif error.get("input", ...) is None:
                empty = "is empty (YAML reads nothing as null)"
                problems.append(f"{path}: field '{field}' {empty}{_empty_hint(error['loc'])}")
            else:
                message = _section_given_a_value(error) or (
                    error["msg"].removeprefix("Value error, ") + _number_as_text(error) + _value_hint(error)
                )
                problems.append(f"{path}: field '{field}' = {_SHORT.repr(error.get('input'))}: {message}")
        raise GridError("\n".join(problems)) from None
    # '~/...' as the shell and SD_ASSETS_STORAGE read it: joined to the grid's folder, it would
    # name a folder called '~' there, and fill it.
    subjects_dir = path.parent / _home_expanded(path, "subjects_dir", grid.subjects_dir)
    storage = grid.storage
    try:
        check_storage_url(storage)
    except StoreError as exc:  # now, not in the run's first step
        reason = str(exc).removeprefix(f"storage {storage!r}: ")
        raise GridError(f"{path}: field 'storage' = {storage!r}: {reason}") from None
    if "://" not in storage:
        storage = str(path.parent / _home_expanded(path, "storage", Path(storage)))
    grid = grid.model_copy(update={"subjects_dir": subjects_dir.resolve(), "storage": storage})
    grid._source = path
    return grid


# Invisible characters that text copied from web pages brings along. At the ends of a line they
# would make a subject that looks like another one, or one that is nothing but them.
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_LINE_END = re.compile(r"\r\n|\r|\n")
_EDGES = re.compile(rf"^[\s{_ZERO_WIDTH}]+|[\s{_ZERO_WIDTH}]+$")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class SubjectList:
    """One subject list file: its name, content hash and subjects in file order."""

    name: str
    sha256: str
    subjects: tuple[str, ...]
    skipped_lines: tuple[str, ...] = ()  # "line <n>: <why>" for the lines it could not take (the first 5)


def parse_subject_list(name: str, data: bytes, max_subjects: int = 10_000) -> SubjectList:
    """Parse one list: one subject per line, blank lines and '#' comments ignored. The text is
    UTF-8 (with or without a byte-order mark), or UTF-16 or UTF-32 that starts with its mark.

    A line over MAX_SUBJECT_LENGTH characters is skipped, with a message in ``skipped_lines``;
    the list's other subjects stand.

    Raises:
        GridError: binary content, text in another encoding, no subjects, or more than ``max_subjects``.
    """
    text = _decoded_text(data, f"subject list {name}")
    # Past the limit subjects and skipped lines are counted, not kept: a list of millions of lines,
    # refused all the same, took twelve times its size in memory to read.
    subjects: list[str] = []
    count = 0
    skipped: list[str] = []
    skipped_count = 0
    for number, line in enumerate(_lines(text), start=1):
        # One spelling of what CLIP's tokenizer reads alike: "é" typed as one character or as "e"
        # and a combining accent, and any run of spaces, tabs or other separators (one space to
        # it). Two spellings would be two subjects: two sets of images of one prompt, their seeds
        # apart (a seed comes from the subject's text).
        subject = _SPACES.sub(" ", _EDGES.sub("", unicodedata.normalize("NFC", line)))
        if not subject or subject.startswith("#"):
            continue
        if len(subject) > MAX_SUBJECT_LENGTH:
            skipped_count += 1
            if len(skipped) < 5:  # the first few name the problem; a message a screen long would bury it
                skipped.append(f"line {number}: {len(subject)} characters, over the {MAX_SUBJECT_LENGTH} a subject has")
            continue
        count += 1
        if count <= max_subjects:
            subjects.append(subject)
    if skipped_count > 5:
        skipped.append(f"{skipped_count - 5} more lines like these")
    if not subjects:
        if skipped:
            detail = f" ({'; '.join(skipped)})"
        elif not text:  # created empty, or not written yet (a byte-order mark at most): "comments" would puzzle
            detail = " (the file is empty)"
        else:
            detail = " (only blank lines or '#' comments)"
        raise GridError(f"subject list {name}: no subjects{detail}")
    if count > max_subjects:
        raise GridError(f"subject list {name}: {count} subjects, more than max_subjects_per_list={max_subjects}")
    return SubjectList(
        name=name, sha256=hashlib.sha256(data).hexdigest(), subjects=tuple(subjects), skipped_lines=tuple(skipped)
    )


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` as an editor shows them, one at a time. str.splitlines would also end
    one at a form feed, U+2028 and the like, splitting one subject in two and numbering lines
    unlike the editor."""
    start = 0
    for end in _LINE_END.finditer(text):
        yield text[start : end.start()]
        start = end.end()
    yield text[start:]


def unique_subjects(lists: list[SubjectList]) -> list[str]:
    """Subjects of all lists, first occurrence wins, so a subject in two lists is generated once."""
    seen: dict[str, None] = {}
    for subject_list in lists:
        for subject in subject_list.subjects:
            seen.setdefault(subject, None)
    return list(seen)

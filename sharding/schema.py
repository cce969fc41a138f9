"""The MMFR vocabulary and the shard sample schema shared by every stage.

`sharding/` writes samples in this schema and `pipeline/` reads them; this
module is the single place where field names, generator names and attribute
names are spelled, so that a typo cannot silently split a stage from another.
It imports nothing from the rest of the project.

The per-sample `json` member (METADATA_SCHEMA, schema version 2): every
sample holds every key below, with the type given, whatever the dataset or
adapter that wrote it; a nullable key is present with the value null rather
than left out, so that a columnar reader (Hugging Face `datasets`, pandas,
Arrow) infers one type per key. The writer checks each sample against this
table (`metadata_problems`). Readers still accept shards of schema 1, which
may lack the keys of OPTIONAL_METADATA_FIELDS.

| key | JSON type | null | meaning |
|---|---|---|---|
| `relpath` | string | no | path of the image relative to the dataset root ("/"-separated) |
| `source` | string | no | "diffusiondb", "laion", or the evaluation set (generator or benchmark name) |
| `split` | string | no | "train" or "eval" |
| `label` | integer | no | 0 real, 1 fake |
| `generator` | string | no | evaluation: the generator set the image belongs to (reals included); training: the source |
| `conversations` | list of list of {from: string, value: string} | no | the LLaVA records' "conversations" lists of the image ([] when it has none) |
| `record_ids` | list of string | no | the LLaVA record "id" of each conversation, same order |
| `attributes` | object {attribute name: string or null} | yes | attribute texts of <name>_reasoning.json (null texts kept); null without annotation |
| `reference` | string | no | the non-null attribute texts joined by one space in sorted key order ("" without any) |
| `has_reasoning` | boolean | no | whether the image has a reasoning annotation |
| `reasoning_index` | integer | yes | 0-based position of the image's entry in <name>_reasoning.json; null when not listed |
| `width` | integer | no | pixel width as stored (before any EXIF rotation) |
| `height` | integer | no | pixel height as stored |
| `format` | string | no | the decoder's format name ("PNG", "JPEG", ...) |
| `sha256` | string | no | hex digest of the image bytes stored in the sample |
| `image_ext` | string | no | extension of the tar member holding the image bytes |
| `schema` | integer | no | SCHEMA_VERSION of the writer |

Attribute names of MMFR are the ten of ATTRIBUTES (five per label); an
annotation holds its label's five, some of them null. The image bytes are the
member `<key>.<image_ext>`, unchanged from the dataset (`sha256` is theirs).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable

# 2: every METADATA_SCHEMA key in every sample, with its declared type (1 let
# writers leave out `reasoning_index`).
SCHEMA_VERSION = 2

# The 10 evaluation generators of MMFR, in the reference's order (tables, plots
# and averages follow this order).
GENERATORS: tuple[str, ...] = (
    "stablediffusion",
    "dalle3",
    "if",
    "midjourney",
    "kandinsky",
    "pixart",
    "flux",
    "gpt4o",
    "styleganxl",
    "gigagan",
)

# Training sources of MMFR: DiffusionDB fakes (PNG) and LAION reals (JPEG).
TRAIN_SOURCES: tuple[str, ...] = ("diffusiondb", "laion")
TRAIN_SOURCE_LABEL: dict[str, int] = {"diffusiondb": 1, "laion": 0}

FORGERY_ATTRIBUTES: tuple[str, ...] = (
    "Inconsistent Lighting and Shadows",
    "Irregular Image Edges",
    "Anomalous Image Texture",
    "Low Image Quality",
    "Semantic Irrationality",
)
AUTHENTICITY_ATTRIBUTES: tuple[str, ...] = (
    "Consistent Lighting and Shadows",
    "Smooth and Natural Image Edges",
    "Natural and Consistent Image Texture",
    "High Image Quality",
    "Semantic Rationality",
)
ATTRIBUTES: tuple[str, ...] = FORGERY_ATTRIBUTES + AUTHENTICITY_ATTRIBUTES

# The question the reference asks at evaluation time.
EVAL_QUESTION = (
    "Is this image real or fake? Please describe the image, reasoning "
    "step-by-step and conclude with 'this image is real' or 'this image is fake'."
)

REAL_CONCLUSION = "This image is real."
FAKE_CONCLUSION = "This image is fake."

# Extensions accepted as images. The shard stores the bytes under the
# extension found on disk, lower-cased ("jpeg" stays "jpeg").
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")

# Names of the folders that hold real and fake images in evaluation sets.
EVAL_LABEL_FOLDERS: dict[str, int] = {"0_real": 0, "1_fake": 1}

@dataclass(frozen=True)
class MetadataField:
    """One key of the per-sample `json` member."""

    name: str
    kind: str  # a FIELD_KINDS key: the JSON type every sample holds under this key
    nullable: bool  # whether the value may be null (the key is present all the same)
    doc: str  # what the value means, one line (it goes into the table of the docstring)


# The JSON types of the metadata values, spelled as in the docstring table.
FIELD_KINDS: dict[str, str] = {
    "string": "string",
    "int": "integer",
    "bool": "boolean",
    "strings": "list of string",
    "conversations": "list of list of {from: string, value: string}",
    "attributes": "object {attribute name: string or null}",
}

# Every key of the per-sample `json` member, in the order of the docstring
# table. Every sample written under schema 2 holds each key with its type.
METADATA_SCHEMA: tuple[MetadataField, ...] = (
    MetadataField("relpath", "string", False, 'path of the image relative to the dataset root ("/"-separated)'),
    MetadataField("source", "string", False,
                  '"diffusiondb", "laion", or the evaluation set (generator or benchmark name)'),
    MetadataField("split", "string", False, '"train" or "eval"'),
    MetadataField("label", "int", False, "0 real, 1 fake"),
    MetadataField("generator", "string", False,
                  "evaluation: the generator set the image belongs to (reals included); training: the source"),
    MetadataField("conversations", "conversations", False,
                  'the LLaVA records\' "conversations" lists of the image ([] when it has none)'),
    MetadataField("record_ids", "strings", False, 'the LLaVA record "id" of each conversation, same order'),
    MetadataField("attributes", "attributes", True,
                  "attribute texts of <name>_reasoning.json (null texts kept); null without annotation"),
    MetadataField("reference", "string", False,
                  'the non-null attribute texts joined by one space in sorted key order ("" without any)'),
    MetadataField("has_reasoning", "bool", False, "whether the image has a reasoning annotation"),
    MetadataField("reasoning_index", "int", True,
                  "0-based position of the image's entry in <name>_reasoning.json; null when not listed"),
    MetadataField("width", "int", False, "pixel width as stored (before any EXIF rotation)"),
    MetadataField("height", "int", False, "pixel height as stored"),
    MetadataField("format", "string", False, 'the decoder\'s format name ("PNG", "JPEG", ...)'),
    MetadataField("sha256", "string", False, "hex digest of the image bytes stored in the sample"),
    MetadataField("image_ext", "string", False, "extension of the tar member holding the image bytes"),
    MetadataField("schema", "int", False, "SCHEMA_VERSION of the writer"),
)
METADATA_FIELD: dict[str, MetadataField] = {f.name: f for f in METADATA_SCHEMA}

# Fields readers must not require: shards written before schema 2 may lack
# them (benchmark adapters did not write `reasoning_index`; a reader treats a
# missing one as "order unknown"). The writer always writes them, null when
# the dataset reader gives none.
OPTIONAL_METADATA_FIELDS: tuple[str, ...] = ("reasoning_index",)
# Fields every shard of every schema version holds.
METADATA_FIELDS: tuple[str, ...] = tuple(f.name for f in METADATA_SCHEMA if f.name not in OPTIONAL_METADATA_FIELDS)


def metadata_table() -> str:
    """The Markdown table of METADATA_SCHEMA (key, JSON type, nullable, meaning)."""
    rows = ["| key | JSON type | null | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {FIELD_KINDS[f.kind]} | {'yes' if f.nullable else 'no'} | {f.doc} |"
             for f in METADATA_SCHEMA]
    return "\n".join(rows)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_turn(t: Any) -> bool:
    return isinstance(t, dict) and t.keys() == {"from", "value"} and all(isinstance(x, str) for x in t.values())


_KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "strings": _is_str_list,
    "conversations": lambda v: isinstance(v, list) and all(
        isinstance(c, list) and all(_is_turn(t) for t in c) for c in v),
    "attributes": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and (x is None or isinstance(x, str)) for k, x in v.items()),
}


def metadata_problems(meta: dict[str, Any]) -> list[str]:
    """What keeps `meta` from matching METADATA_SCHEMA: missing, undeclared and mistyped keys."""
    problems = []
    missing = [f.name for f in METADATA_SCHEMA if f.name not in meta]
    if missing:
        problems.append(f"metadata lacks {missing}")
    undeclared = sorted(k for k in meta if k not in METADATA_FIELD)
    if undeclared:
        problems.append(f"metadata keys {undeclared} are not declared in sharding.schema.METADATA_SCHEMA "
                        "(declare them there, so that every sample and sharding.hf_features() carry them)")
    for f in METADATA_SCHEMA:
        v = meta.get(f.name)
        if f.name in meta and not (v is None and f.nullable) and not _KIND_CHECKS[f.kind](v):
            problems.append(f"metadata {f.name!r} is {v!r:.80}, expected {FIELD_KINDS[f.kind]}"
                            + (" or null" if f.nullable else ""))
    return problems


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(relpath: str) -> str:
    """Stable webdataset key for an image, derived from its dataset-relative path.

    webdataset groups tar members by the part of the basename before the first
    dot, so keys must not contain dots; paths may also hold spaces or unicode.
    The readable slug keeps keys greppable; the hash of the exact path keeps
    two paths that slug to the same text apart.
    """
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    slug = _KEY_UNSAFE.sub("_", stem).strip("_")[-80:]
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}"


def reference_text(attributes: dict[str, str | None] | None) -> str:
    """The evaluation reference: non-null attribute texts joined in sorted key order."""
    if not attributes:
        return ""
    return " ".join(attributes[k] for k in sorted(attributes) if attributes[k])


# Words that negate a conclusion ("This image is not fake.", "isn't real",
# "non-real"). A negated conclusion is not a decision: reading "not fake" as
# real would be a guess about what the writer meant, so it is left undecided.
NEGATION_RE = re.compile(r"\b(?:not|no|never|neither|nor|cannot|non|nothing|none|without)\b|n't\b|n’t\b", flags=re.I)
# The class words, matched as whole words: "unrealistic" or "realistic" is not
# "real", "fakery" is not "fake".
_FAKE_WORD = re.compile(r"\bfake\b", flags=re.I)
_REAL_WORD = re.compile(r"\breal\b", flags=re.I)
_CONCLUSION_BLOCK = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", flags=re.S)


def conclusion_signals(text: str) -> tuple[bool, bool, bool]:
    """(names fake, names real, is negated) of a conclusion text (whole words, any case)."""
    return bool(_FAKE_WORD.search(text)), bool(_REAL_WORD.search(text)), bool(NEGATION_RE.search(text))


def conclusion_text_label(text: str) -> int | None:
    """1 if a conclusion text names fake, 0 if real; None if it names both, neither, or is negated."""
    has_fake, has_real, negated = conclusion_signals(text)
    if negated or has_fake == has_real:
        return None
    return 1 if has_fake else 0


def conclusion_label(answer: str) -> int | None:
    """1 if the answer concludes fake, 0 if real, None if it has no usable <CONCLUSION>.

    The first <CONCLUSION>...</CONCLUSION> block decides (whitespace around
    the sentence does not matter): it must name exactly one of the whole words
    "fake"/"real" and hold no negation (see conclusion_text_label). This labels
    training conversations and reads generated answers, so both agree.
    """
    m = _CONCLUSION_BLOCK.search(answer)
    if m is None:
        return None
    return conclusion_text_label(m.group(1))

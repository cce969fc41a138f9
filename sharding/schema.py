"""The MMFR vocabulary and the shard sample schema shared by every stage.

`sharding/` writes samples in this schema and `pipeline/` reads them; this
module is the single place where field names, generator names and attribute
names are spelled, so that a typo cannot silently split a stage from another.
It imports nothing from the rest of the project.
"""
from __future__ import annotations

import hashlib
import re

SCHEMA_VERSION = 1

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

# Fields of the per-sample `json` member. Documented here once:
#   relpath       path of the image relative to the dataset root ("/"-separated)
#   source        top-level source: "diffusiondb", "laion", or the evaluation
#                 set name (a generator name, or a benchmark's set name)
#   split         "train" or "eval"
#   label         0 real, 1 fake
#   generator     evaluation: the generator set the image belongs to (reals
#                 included, so that per-generator real accuracy exists);
#                 training: the source name
#   conversations list of conversations; each is the LLaVA record's
#                 "conversations" list of {"from", "value"} turns
#   record_ids    the LLaVA record "id" of each conversation, same order
#   attributes    attribute name -> text or None from <name>_reasoning.json,
#                 or None when the image has no reasoning annotation
#   reference     the non-null attribute texts joined by one space in sorted
#                 key order ("" when there is no annotation)
#   has_reasoning whether `attributes` came from an annotation file
#   reasoning_index  (optional; MMFR sharder) 0-based position of the image's
#                 entry in its <name>_reasoning.json, None when not listed.
#                 The reference evaluation selects images in that file's order.
#                 Shards written before it existed lack the field; readers
#                 treat a missing field as "order unknown" (OPTIONAL_METADATA_FIELDS)
#   width, height pixel size as decoded (before any EXIF rotation)
#   format        the decoder's format name ("PNG", "JPEG", ...)
#   sha256        hex digest of the image bytes stored in the sample
#   image_ext     the tar member extension holding the image bytes
#   schema        SCHEMA_VERSION
METADATA_FIELDS: tuple[str, ...] = (
    "relpath",
    "source",
    "split",
    "label",
    "generator",
    "conversations",
    "record_ids",
    "attributes",
    "reference",
    "has_reasoning",
    "width",
    "height",
    "format",
    "sha256",
    "image_ext",
    "schema",
)

# Fields some writers add and readers must not require (old shards lack them).
OPTIONAL_METADATA_FIELDS: tuple[str, ...] = ("reasoning_index",)

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

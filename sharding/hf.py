"""Reading the shards with Hugging Face `datasets` (its packaged `webdataset` builder).

    import sharding
    ds = sharding.load_hf_dataset("shards/eval/dalle3")          # a shard set folder
    ds = sharding.load_hf_dataset("shards/train/shard-*.tar")    # or a glob, or a list of tars
    image = sharding.hf_image(ds[0])                             # PIL image, whatever its format
    # the same with datasets alone:
    ds = datasets.load_dataset("webdataset", data_files=tars, features=sharding.hf_features(),
                               split="train")

Why `features=` is needed: without it the builder infers the columns from the
first 5 samples of the first tar. It refuses a shard whose samples differ in
their image extension (training mixes diffusiondb `png` with laion `jpg`;
evaluation sets mix `jpg`, `png`, `webp`), and it types a key that is null or
[] in those 5 samples as `null`, failing on the first later sample with a
value ("Couldn't cast array of type string to null"). The shards keep every
image's original bytes and extension (forensic evidence: re-encoding would
change what a detector sees), so the columns are declared instead:

- one `datasets.Image()` column per extension of schema.IMAGE_EXTENSIONS
  (`png`, `jpg`, `jpeg`, `webp`, ...); in each row the column named by
  `json.image_ext` holds the image, the others are None (the builder fills a
  declared column a sample lacks with None). The stored bytes are the
  original file's: `ds.cast_column("png", datasets.Image(decode=False))`
  gives them back, with the sha256 of `json.sha256`;
- `json`: a struct typed after schema.METADATA_SCHEMA (see the table in
  `sharding/schema.py`): strings, int64, bool, lists of strings, the
  conversations as lists of lists of {from, value} structs, and `attributes`
  as a struct of the attribute names (the ten MMFR ones by default), each a
  nullable string; an annotation's absent names read as None, and an image
  without annotation has `attributes` None;
- `__key__` (the webdataset sample key) and `__url__` (the tar it came from).

Names outside `attribute_names` (possible only in a benchmark listing's own
`reasoning` objects) are not columns; pass them to `hf_features`.

`datasets` is imported only when these functions run: sharding itself does
not depend on it.
"""
from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Any, Sequence

from . import schema

if TYPE_CHECKING:
    import datasets


def _kind_features(attribute_names: Sequence[str]) -> dict[str, Any]:
    """The `datasets` feature of each schema.FIELD_KINDS kind."""
    from datasets import List, Value

    return {
        "string": Value("string"),
        "int": Value("int64"),
        "bool": Value("bool"),
        "strings": List(Value("string")),
        "conversations": List(List({"from": Value("string"), "value": Value("string")})),
        "attributes": {name: Value("string") for name in attribute_names},
    }


def hf_features(attribute_names: Sequence[str] = schema.ATTRIBUTES) -> "datasets.Features":
    """The `datasets.Features` of a shard set written by this package (see the module doc)."""
    from datasets import Features, Image, Value

    kinds = _kind_features(attribute_names)
    features: dict[str, Any] = {"__key__": Value("string"), "__url__": Value("string")}
    features.update({ext: Image() for ext in schema.IMAGE_EXTENSIONS})
    features["json"] = {f.name: kinds[f.kind] for f in schema.METADATA_SCHEMA}
    return Features(features)


def shard_files(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The tar files of a shard set folder, of a glob, or of a list of paths, in name order."""
    if not isinstance(shards, (str, os.PathLike)):
        files = [os.fspath(p) for p in shards]
    elif os.path.isdir(shards):
        files = sorted(glob.glob(os.path.join(glob.escape(os.fspath(shards)), "shard-*.tar")))
    else:
        files = sorted(glob.glob(os.fspath(shards))) if glob.has_magic(os.fspath(shards)) else [os.fspath(shards)]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"{os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else shards}: "
                                f"no shard tar found" + (f" ({missing[0]} does not exist)" if missing else ""))
    return files


def load_hf_dataset(shards: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                    attribute_names: Sequence[str] = schema.ATTRIBUTES, **kwargs: Any) -> "datasets.Dataset":
    """`datasets.load_dataset("webdataset", ...)` of our shards with `hf_features()`.

    `shards`: a shard set folder (its `shard-*.tar`), a glob or a list of tars.
    `split` names the split (`datasets` wants one; the shards do not say).
    Other keyword arguments go to `load_dataset` (`cache_dir`, `streaming`, ...).
    """
    import datasets

    return datasets.load_dataset("webdataset", data_files={split: shard_files(shards)},
                                 features=hf_features(attribute_names), split=split, **kwargs)


def hf_image(row: dict[str, Any]) -> Any:
    """The image of a row of `load_hf_dataset` (from its `json.image_ext` column)."""
    return row[row["json"]["image_ext"]]

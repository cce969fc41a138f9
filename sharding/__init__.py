"""sharding package: writes WebDataset shards (see schema.py for the sample schema).

`hf_features` / `load_hf_dataset` / `hf_image` read them with Hugging Face
`datasets` (sharding/hf.py; `datasets` is imported only when they are called).
"""
from .hf import hf_features, hf_image, load_hf_dataset

__all__ = ["hf_features", "hf_image", "load_hf_dataset"]

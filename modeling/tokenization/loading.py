"""Loading the LLM tokenizer from a local folder, exactly as SentencePiece encodes.

Every stage (training, checkpoint export/import, evaluation) loads its
tokenizer with `load_tokenizer(path)`, so they all get the same ids.

Why not plain `AutoTokenizer.from_pretrained`: LLaVA-1.5, Vicuna and MoF
folders ship a SentencePiece `tokenizer.model` and often no `tokenizer.json`.
The reference trains with the sentencepiece-backed tokenizer (LLaVA loads it
with `use_fast=False`), so SentencePiece's ids are the spec. transformers 5
has no sentencepiece-backed LlamaTokenizer any more: for such a folder it builds
a fast BPE whose merges are ranked by piece id, not by piece score as
SentencePiece ranks them, and whose pre-tokenizer skips the dummy prefix when
a text starts with a space. Leading spaces and runs of spaces then get other
ids than SentencePiece gives (measured on the real LLaMA vocabulary: 3,646 of
5,510 probe texts matched).

So when a folder has `tokenizer.model`, this module builds the fast tokenizer
itself from the SentencePiece model proto (merges in score order, the model's
own normalizer settings, byte fallback), takes only metadata from the folder's
json files (special tokens, added tokens beyond the SentencePiece vocabulary,
model_max_length, padding side), and then checks it against
`sentencepiece.SentencePieceProcessor` on a probe set before returning it. A
mismatch raises `TokenizerMismatchError` naming the folder, the number of
differing probes and one example; a tokenizer is never silently different.

A `tokenizer.json` next to `tokenizer.model` is not used for encoding (the
SentencePiece model is the spec); it is checked on the same probes and a
disagreement is logged, so the user knows that folder's fast tokenizer was
wrong. Folders without `tokenizer.model` (the project's own byte-level BPE)
are loaded with AutoTokenizer, which reads their `tokenizer.json` as written.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig

from modeling.checkpoints.input_paths import TOKENIZER_FOLDER, path_problem
from modeling.checkpoints.tensor_io import CheckpointError

# Re-exported: the public names of the tokenizer-loading API live in one place.
from modeling.tokenization.sentencepiece_tokenizer import (  # noqa: F401
    SP_MODEL_FILE,
    TOKENIZER_JSON,
    SentencePieceTokenizerFast,
    TokenizerLoadError,
    TokenizerMismatchError,
    tokenizer_from_sentencepiece,
)
from modeling.tokenization.probes import (  # noqa: F401
    PROBE_TEXTS,
    ProbeMismatch,
    _report_tokenizer_json,
    check_against_sentencepiece,
    probe_texts,
    sentencepiece_mismatches,
)

log = logging.getLogger(__name__)

def load_tokenizer(path: str | Path):
    """The tokenizer of a local folder; SentencePiece-exact when the folder has `tokenizer.model`.

    With `tokenizer.model`: a fast tokenizer built from it, checked against
    sentencepiece on PROBE_TEXTS (TokenizerMismatchError on any difference).
    Without: `AutoTokenizer.from_pretrained` on the folder. In both cases a
    tokenizer without a pad token gets pad = unk, the LLaVA/Vicuna v1
    convention (batches are right-padded, and the reference pads with unk).
    Raises TokenizerLoadError when the folder cannot be read.
    """
    folder = Path(path)
    problem = path_problem(folder, TOKENIZER_FOLDER)
    if problem is not None:
        raise TokenizerLoadError(f"{folder}: {problem}")
    if (folder / SP_MODEL_FILE).is_file():
        tokenizer = _load_sentencepiece_folder(folder)
    else:
        try:
            # An empty config: the folder's config.json may describe our model or the
            # reference's llava_llama, which transformers does not know; the tokenizer
            # files say their class themselves.
            tokenizer = AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig())
        except (OSError, ValueError) as exc:
            raise TokenizerLoadError(f"{folder}: cannot load its tokenizer ({exc})") from exc
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        log.info("%s: the tokenizer has no pad token; using unk %r (LLaVA's v1 convention)",
                 folder, tokenizer.unk_token)
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer



def _load_sentencepiece_folder(folder: Path) -> SentencePieceTokenizerFast:
    tokenizer = tokenizer_from_sentencepiece(folder)
    check_against_sentencepiece(tokenizer, folder, "the fast tokenizer built from tokenizer.model")
    if (folder / TOKENIZER_JSON).is_file():
        _report_tokenizer_json(folder)
    return tokenizer


def load_checkpoint_tokenizer(directory: str | Path):
    """The tokenizer of a checkpoint directory (load_tokenizer: SentencePiece-exact
    when it holds tokenizer.model), with errors as CheckpointError."""
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({exc})") from exc

"""A fast tokenizer rebuilt from a SentencePiece `tokenizer.model` (merges in score
order, the model's own normalizer and byte-fallback settings), with only metadata
taken from the folder's json files. Checked against sentencepiece by
modeling.tokenization.probes; loaded by modeling.tokenization.loading."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from modeling.tokenization.export import TOKENIZER_CONFIG, portable_tokenizer_config

SP_MODEL_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS_JSON = "added_tokens.json"

# SentencePiece's ModelProto.SentencePiece.Type values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType values this module can rebuild.
_UNIGRAM, _BPE = 1, 2

class TokenizerLoadError(ValueError):
    """A tokenizer folder cannot be turned into a tokenizer; the message names the folder and the reason."""


class TokenizerMismatchError(TokenizerLoadError):
    """The tokenizer built for a folder encodes some probe text differently from its SentencePiece model."""


class SentencePieceTokenizerFast(PreTrainedTokenizerFast):
    """A fast tokenizer rebuilt from a SentencePiece model, that saves the model with itself.

    transformers saves a fast tokenizer as tokenizer.json only and drops
    add_bos_token/add_eos_token from tokenizer_config.json. This class also
    copies tokenizer.model into the saved folder and writes back the source
    folder's tokenizer_class and bos/eos flags, so `load_tokenizer` rebuilds
    and verifies the same tokenizer from a checkpoint, and tools that load
    LLaVA folders (the reference: a slow LlamaTokenizer) read it as before.
    """

    def __init__(self, *args, saved_config: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Fields written into the saved tokenizer_config.json over transformers' own.
        self.saved_config = dict(saved_config or {})

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        files = super()._save_pretrained(save_directory, file_names, legacy_format=legacy_format,
                                         filename_prefix=filename_prefix)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        model_out = Path(save_directory) / f"{prefix}{SP_MODEL_FILE}"
        if Path(self.vocab_file).resolve() != model_out.resolve():
            shutil.copyfile(self.vocab_file, model_out)
        config_out = Path(save_directory) / f"{prefix}{TOKENIZER_CONFIG}"
        config = _read_json(config_out)
        config.update(self.saved_config)
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        config = portable_tokenizer_config(config)  # readable by transformers 4 too
        config_out.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return (*files, str(model_out))



def _sentencepiece():
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # a runtime dependency (pyproject.toml); say so rather than fail obscurely
        raise TokenizerLoadError(
            f"a {SP_MODEL_FILE} tokenizer needs the 'sentencepiece' and 'protobuf' packages ({exc})"
        ) from exc
    return sentencepiece, sentencepiece_model_pb2


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{path}: not readable as json ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a json object, found {type(data).__name__}")
    return data


def _added_token(value, source: Path, special: bool) -> AddedToken | None:
    """A token as transformers writes it in json (a string, or an AddedToken dict), or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=bool(value.get("special", special)),
        )
    raise TokenizerLoadError(f"{source}: cannot read the token {value!r} (expected a string or a token object)")


def _extra_added_tokens(folder: Path, config: dict, n_pieces: int, pieces: list[str]) -> dict[int, AddedToken]:
    """Tokens the folder adds beyond the SentencePiece vocabulary, by id.

    They can be recorded in tokenizer_config.json (added_tokens_decoder, what
    transformers >= 4.34 writes), added_tokens.json (older) or tokenizer.json;
    all three are read and must agree. Entries below `n_pieces` restate the
    SentencePiece pieces and must name the same piece.
    """
    found: dict[int, tuple[AddedToken, Path]] = {}

    def put(token_id, token: AddedToken, source: Path) -> None:
        try:
            token_id = int(token_id)
        except (TypeError, ValueError) as exc:
            raise TokenizerLoadError(f"{source}: added token id {token_id!r} is not an integer") from exc
        if token_id < n_pieces:
            if pieces[token_id] != token.content:
                raise TokenizerLoadError(
                    f"{source}: says id {token_id} is {token.content!r}, but {folder / SP_MODEL_FILE} "
                    f"has {pieces[token_id]!r} there"
                )
            return
        if token_id in found and found[token_id][0].content != token.content:
            raise TokenizerLoadError(
                f"{folder}: id {token_id} is {found[token_id][0].content!r} in {found[token_id][1].name} "
                f"but {token.content!r} in {source.name}"
            )
        found.setdefault(token_id, (token, source))

    cfg_path = folder / TOKENIZER_CONFIG
    for token_id, value in (config.get("added_tokens_decoder") or {}).items():
        put(token_id, _added_token(value, cfg_path, special=False), cfg_path)
    added_path = folder / ADDED_TOKENS_JSON
    for content, token_id in _read_json(added_path).items():
        put(token_id, AddedToken(content, normalized=False), added_path)
    json_path = folder / TOKENIZER_JSON
    for entry in _read_json(json_path).get("added_tokens") or []:
        put(entry.get("id"), _added_token(entry, json_path, special=False), json_path)

    expected = list(range(n_pieces, n_pieces + len(found)))
    if sorted(found) != expected:
        raise TokenizerLoadError(
            f"{folder}: added token ids {sorted(found)} do not continue the {n_pieces} pieces of "
            f"{SP_MODEL_FILE} without gaps"
        )
    return {i: t for i, (t, _) in sorted(found.items())}


def _score_ranked_merges(proto) -> list[tuple[str, str]]:
    """BPE merges ranked as SentencePiece applies them: by the score of the merged piece.

    SentencePiece's BPE repeatedly joins the adjacent pair whose concatenation
    is a normal piece with the highest score. Only normal pieces take part
    (bytes, control, unused and user-defined pieces are never produced by a
    merge). Equal scores are ordered by piece id.
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _backend_from_proto(proto, source: Path) -> Tokenizer:
    """A `tokenizers` pipeline that follows the SentencePiece model's own settings."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerLoadError(f"{source}: treat_whitespace_as_suffix=true SentencePiece models are not supported")
    pieces = [p.piece for p in proto.pieces]
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    unk_piece = pieces[trainer.unk_id] if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == _BPE:
        model = models.BPE(
            vocab={piece: i for i, piece in enumerate(pieces)},
            merges=_score_ranked_merges(proto),
            unk_token=unk_piece,
            # SentencePiece emits one unk for a run of unknown characters.
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            dropout=None,
            # Merges never build a user-defined piece, so an isolated one is found
            # by this whole-chunk lookup (which the BPE does first when set).
            ignore_merges=bool(user_defined),
        )
    elif trainer.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerLoadError(f"{source}: SentencePiece model_type {trainer.model_type} (only BPE and unigram "
                                 "models can be rebuilt as a fast tokenizer)")
    backend = Tokenizer(model)

    # The normalizer, in SentencePiece's order: character map, whitespace
    # clean-up (spaces only; newlines stay), dummy prefix, then " " -> "▁".
    # No pre-tokenizer: SentencePiece encodes the whole normalized text as one
    # sequence, so pieces such as "▁▁" can form across word boundaries.
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        # Always one more "▁", also before a text that starts with a space
        # (the step transformers' Metaspace pre-tokenizer skips).
        steps.append(normalizers.Prepend(" " if norm.escape_whitespaces else "▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)

    parts = [decoders.Replace("▁", " ")] if norm.escape_whitespaces else []
    if trainer.byte_fallback:
        parts.append(decoders.ByteFallback())
    # Fuse first, so Strip removes the dummy prefix of the text, not a space of every token.
    parts.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        parts.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(parts)

    if user_defined:
        # SentencePiece emits a user-defined piece whole wherever it occurs in the
        # normalized text (after the dummy prefix), and never merges it with its
        # neighbours: isolate it, and let the model look the whole chunk up.
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    # Control and unknown pieces are special tokens (skipped by decode(skip_special_tokens=True)).
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    return backend


def _special(config: dict, special_map: dict, key: str, folder: Path, proto_piece: str | None) -> AddedToken | None:
    """A named special token: tokenizer_config.json, else special_tokens_map.json, else the SentencePiece model's."""
    for source, data in ((folder / TOKENIZER_CONFIG, config), (folder / SPECIAL_TOKENS_MAP, special_map)):
        if key in data:
            return _added_token(data[key], source, special=True)
    return AddedToken(proto_piece, special=True, normalized=False) if proto_piece else None


def tokenizer_from_sentencepiece(folder: str | Path) -> SentencePieceTokenizerFast:
    """A fast tokenizer built from `<folder>/tokenizer.model` and the folder's json metadata (not yet verified)."""
    folder = Path(folder)
    model_file = folder / SP_MODEL_FILE
    _, model_pb2 = _sentencepiece()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise TokenizerLoadError(f"{model_file}: not a SentencePiece model ({type(exc).__name__}: {exc})") from exc
    pieces = [p.piece for p in proto.pieces]
    if not pieces:
        raise TokenizerLoadError(f"{model_file}: the SentencePiece model has no pieces")

    config = _read_json(folder / TOKENIZER_CONFIG)
    special_map = _read_json(folder / SPECIAL_TOKENS_MAP)
    backend = _backend_from_proto(proto, model_file)
    extra = _extra_added_tokens(folder, config, len(pieces), pieces)
    for token_id, token in extra.items():
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if backend.token_to_id(token.content) != token_id:
            raise TokenizerLoadError(f"{folder}: added token {token.content!r} should get id {token_id}, "
                                     f"got {backend.token_to_id(token.content)}")
    size = backend.get_vocab_size(with_added_tokens=True)

    def piece(i: int) -> str | None:
        return pieces[i] if 0 <= i < len(pieces) else None

    spec = proto.trainer_spec
    named = {key: _special(config, special_map, key, folder, proto_piece)
             for key, proto_piece in (("bos_token", piece(spec.bos_id)), ("eos_token", piece(spec.eos_id)),
                                      ("unk_token", piece(spec.unk_id)), ("pad_token", piece(spec.pad_id)))}
    for key, token in named.items():
        if token is not None and backend.token_to_id(token.content) is None:
            raise TokenizerLoadError(f"{folder}: {key} {token.content!r} is neither a piece of {SP_MODEL_FILE} "
                                     "nor an added token of the folder; it would grow the vocabulary")
    add_bos = bool(config.get("add_bos_token", named["bos_token"] is not None))
    add_eos = bool(config.get("add_eos_token", False))
    for flag, key in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and named[key] is None:
            raise TokenizerLoadError(f"{folder}: add_{key} is true but the folder has no {key}")
    # bos/eos framing as LLaMA's tokenizer does it (the template reads it back
    # from the tokenizer, modeling/template.py `_leading_ids`).
    head = [named["bos_token"].content] if add_bos else []
    tail = [named["eos_token"].content] if add_eos else []
    if head or tail:
        framing = {t: backend.token_to_id(t) for t in head + tail}
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(head + ["$A:0"] + tail),
            pair=" ".join(head + ["$A:0"] + tail + head + ["$B:1"] + tail),
            special_tokens=list(framing.items()),
        )

    kwargs = {k: v for k, v in named.items() if v is not None}
    for key in ("model_max_length", "padding_side", "truncation_side", "chat_template"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    tokenizer = SentencePieceTokenizerFast(
        tokenizer_object=backend,
        saved_config={"tokenizer_class": config.get("tokenizer_class") or "PreTrainedTokenizerFast"},
        # Saved next to tokenizer.json by save_pretrained, so a checkpoint's
        # tokenizer is rebuilt (and verified) from the same model on reload.
        vocab_file=str(model_file),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        # SentencePiece's decode does not clean up spaces; neither may we.
        clean_up_tokenization_spaces=False,
        name_or_path=str(folder),
        **kwargs,
    )
    if len(tokenizer) != size:
        raise TokenizerLoadError(f"{folder}: the tokenizer has {len(tokenizer)} tokens after setting its special "
                                 f"tokens, expected {size} ({len(pieces)} pieces + {len(extra)} added)")
    return tokenizer

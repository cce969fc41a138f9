"""The Vicuna v1 prompt template: token ids, supervision mask and image position.

The rendered text of one training sample is

    {VICUNA_SYSTEM} USER: <image>\\n{question} ASSISTANT: {answer}</s>

(and a generation prompt stops after "ASSISTANT:"). Token ids are built by
concatenating separately tokenised segments:

    [bos] + tok("{system} USER: ") + [IMAGE_TOKEN_INDEX]
          + tok("\\n{question} ASSISTANT:") + answer tokens + [eos]

so the supervision mask is known by construction, never re-derived from
lengths of re-tokenised text (the reference does that, with a "-2" fudge, and
silently drops samples when the lengths disagree).

Generation prompts can also use LLaVA's `llava_v1` conversation
(`conversation="llava_v1"`): the same layout (roles "USER"/"ASSISTANT",
separators " " and "</s>") with another system text, "a curious human ... the
human's questions". The reference trains with Vicuna v1 but its evaluation
script prompts with `llava_v1`, so the reference evaluation protocol needs it;
training examples always use Vicuna v1.

Why the segments are tokenised the way they are:
- The two prompt segments are tokenised as texts of their own, exactly like
  LLaVA's `tokenizer_image_token` (which tokenises the chunks around `<image>`
  separately). For a sentencepiece-style tokenizer that adds a dummy prefix
  ("▁") this gives the same ids as the reference, so a model imported from the
  reference sees the prompt it was trained on.
- The answer is the continuation " {answer}" after "ASSISTANT:". Its leading
  space must be encoded the way the tokenizer encodes it *after a word*: a
  byte-level BPE gives "ĠThis", a sentencepiece-style one "▁This"; an answer that
  starts with an added token (e.g. "<REASONING>") gets a separate space token.
  Encoding the segment on its own would get this wrong for one family or the
  other, so it is encoded behind the anchor "ASSISTANT:" and the anchor's ids,
  checked to be an unchanged prefix, are removed. If a tokenizer merges across
  that boundary the example is refused with an error, never mis-masked.
"""
from __future__ import annotations

from dataclasses import dataclass

# The LLaVA convention: the image placeholder is one position holding this
# sentinel id (no tokenizer maps to it); the model splices image features there.
IMAGE_TOKEN_INDEX = -200
# Label value ignored by the loss (torch's cross-entropy default ignore_index).
IGNORE_INDEX = -100
# The placeholder as it appears in rendered text and in LLaVA-style records.
IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's conv_llava_v1 system text (its evaluation conversation).
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"

# Conversation name -> system text. Both use the Vicuna v1 layout (roles, " "
# between system and turns, "</s>" after an answer), so only the system differs.
CONVERSATIONS: dict[str, str] = {"vicuna_v1": VICUNA_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}
DEFAULT_CONVERSATION = "vicuna_v1"

# The text an answer follows (see encode_answer).
_ANSWER_ANCHOR = f"{ASSISTANT_ROLE}:"


def _prefix_text(conversation: str) -> str:
    """"{system} USER: " of a conversation name (see CONVERSATIONS)."""
    if conversation not in CONVERSATIONS:
        raise ValueError(f"conversation {conversation!r} is not one of {sorted(CONVERSATIONS)}")
    return f"{CONVERSATIONS[conversation]} {USER_ROLE}: "


class PromptTooLongError(ValueError):
    """The prompt (system, image, question) alone does not fit into max_length."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised (question, answer) pair."""

    # Token ids; the image placeholder is the single entry IMAGE_TOKEN_INDEX.
    input_ids: list[int]
    # Same length as input_ids: IGNORE_INDEX everywhere except the answer
    # tokens and the closing eos, which carry their own ids.
    labels: list[int]
    # Index of IMAGE_TOKEN_INDEX in input_ids.
    image_position: int
    # Answer (+ eos) tokens cut off by max_length; 0 when nothing was cut.
    truncated_tokens: int = 0


def render_text(question: str, answer: str | None = None, conversation: str = DEFAULT_CONVERSATION) -> str:
    """The template as text (for logs, docs and tests); None answer = generation prompt."""
    text = f"{_prefix_text(conversation)}{IMAGE_PLACEHOLDER}\n{clean_question(question)} {_ANSWER_ANCHOR}"
    if answer is not None:
        text += f" {answer}</s>"
    return text


def clean_question(question: str) -> str:
    """Remove an `<image>` placeholder from a question, as LLaVA's preprocessing does.

    MMFR/LLaVA records spell the human turn "<image>\\n{question}" (sometimes
    with the placeholder at the end); the template puts the image in its one
    canonical place, so the placeholder is taken out of the text.
    """
    return question.replace(IMAGE_PLACEHOLDER, "").strip()


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of `text` with no special tokens, defensively dropping a bos/eos some tokenizers still add."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def _leading_ids(tokenizer) -> list[int]:
    """[bos] if this tokenizer starts its sequences with bos (its own convention), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [bos] if probe and probe[0] == bos else []


def _check_text(name: str, text: str, tokenizer) -> None:
    # A literal eos/bos in the data would end or restart the sequence in the
    # middle of the answer; refuse it rather than train on it.
    for tok in (tokenizer.eos_token, tokenizer.bos_token):
        if tok and str(tok) in text:
            raise ValueError(f"{name} contains the special token {str(tok)!r}: {text[:80]!r}")


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Ids of " {answer}" as they follow "ASSISTANT:" (no eos).

    Shared by training examples, forced generation prefixes and the CPM token
    lookup, so the three agree on every id.
    """
    anchor = _encode(tokenizer, _ANSWER_ANCHOR)
    joined = _encode(tokenizer, f"{_ANSWER_ANCHOR} {answer}")
    if joined[: len(anchor)] != anchor:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} merges {_ANSWER_ANCHOR!r} with the answer that "
            f"follows it ({answer[:40]!r}...), so the answer cannot be masked exactly"
        )
    return joined[len(anchor):]


def _prompt_ids(tokenizer, question: str, conversation: str = DEFAULT_CONVERSATION) -> tuple[list[int], int]:
    prefix = _prefix_text(conversation)
    q = clean_question(question)
    if not q:
        raise ValueError("question is empty (after removing the <image> placeholder)")
    _check_text("question", q, tokenizer)
    head = _leading_ids(tokenizer) + _encode(tokenizer, prefix)
    tail = _encode(tokenizer, f"\n{q} {_ANSWER_ANCHOR}")
    return head + [IMAGE_TOKEN_INDEX] + tail, len(head)


def build_prompt(tokenizer, question: str, answer_prefix: str = "",
                 conversation: str = DEFAULT_CONVERSATION) -> tuple[list[int], int]:
    """Generation prompt ids ending with "ASSISTANT:" and the image position.

    `answer_prefix` (e.g. "<CONCLUSION>This image is") forces the start of the
    answer with exactly the ids training used for it; it should end at a word
    boundary, where a tokenizer cannot merge it with the text that follows.
    `conversation`: a CONVERSATIONS name, "vicuna_v1" (training's) by default.
    """
    ids, image_position = _prompt_ids(tokenizer, question, conversation)
    if answer_prefix:
        _check_text("answer_prefix", answer_prefix, tokenizer)
        ids = ids + encode_answer(tokenizer, answer_prefix)
    return ids, image_position


def build_training_example(
    tokenizer,
    question: str,
    answer: str,
    max_length: int | None = None,
    image_seq_len: int = 1,
) -> TrainingExample:
    """Tokenise one (question, answer) pair for teacher-forced training.

    max_length: budget of LLM positions (None = unlimited). The image counts as
        `image_seq_len` positions (the number of fused image tokens the model
        puts in place of the placeholder, 576 for the paper model), so the
        budget is the real sequence length the LLM will see.
    Truncation policy: the prompt (system, image, question) is never cut; the
    answer is cut from its end, and then the closing eos is dropped too (the
    model must not learn to stop mid-answer). `truncated_tokens` reports how
    many answer/eos ids were removed. A prompt that leaves no room for a single
    answer token raises PromptTooLongError, for the caller to count and skip.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; the template ends answers with it")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    if not answer.strip():
        raise ValueError("answer is empty")
    _check_text("answer", answer, tokenizer)
    prompt, image_position = _prompt_ids(tokenizer, question)
    answer_ids = encode_answer(tokenizer, answer) + [tokenizer.eos_token_id]

    truncated = 0
    if max_length is not None:
        room = max_length - (len(prompt) - 1 + image_seq_len)
        if room < 1:
            raise PromptTooLongError(
                f"prompt needs {len(prompt) - 1 + image_seq_len} positions (image counted as "
                f"{image_seq_len}), max_length is {max_length}: no room for the answer"
            )
        if len(answer_ids) > room:
            truncated = len(answer_ids) - room
            answer_ids = answer_ids[:room]

    return TrainingExample(
        input_ids=prompt + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt) + answer_ids,
        image_position=image_position,
        truncated_tokens=truncated,
    )

"""modeling.tokenization: the tokenizers the model reads and writes.

Owns the offline byte-level BPE tokenizer of the tiny preset and the CPM token
lookup (`tokenizer`), the SentencePiece-exact fast tokenizer of a LLaMA folder
(`sentencepiece_tokenizer`), loading any tokenizer folder with the reference's
ids (`loading`), the probes that check a tokenizer's ids against the template
(`probes`) and writing a tokenizer next to an export (`export`). It may import
`common`, transformers, tokenizers and sentencepiece, and `modeling.checkpoints.input_paths`
for the kinds of folder it checks; nothing else of `modeling`.
"""

"""The names of the checkpoint formats on disk, in one place below every module
that writes or recognises them (checkpoint, hf_auto, base, reference)."""

MERGED_MODEL_TYPE = "fakereasoning"
"""config.json "model_type" of a merged export; also what `import modeling`
registers with transformers' AutoConfig and AutoModel."""
TRAINABLE_FORMAT = "fakereasoning-trainable"
"""model_config.json "format" of a trainable export (LoRA adapter + trained modules)."""
FORMAT_VERSION = 1
"""Version of both of our formats, written next to the format's name."""
LLAVA_MODEL_TYPE = "llava_llama"
"""config.json "model_type" of the reference's released LLaVA-style folders."""

"""modeling.checkpoints: the model's weights on disk.

Owns the names of the on-disk formats (`formats`), tensor files and LoRA key
handling (`tensor_io`), the base towers and LLM read from local folders
(`base`), our trainable and merged exports and their loading (`checkpoint`),
the reference's released `llava_llama` folder (`reference`), transformers'
Auto classes for a merged export (`hf_auto`), the export's model card
(`model_card`), the checks of input folders (`input_paths`) and 8/4-bit
loading (`quantization`). It may import `common`, `modeling.tokenization` and
the model modules at the top of `modeling`; of this package, the model modules
import only `base` and `tensor_io`.
"""

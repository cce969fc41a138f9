"""modeling package: the FakeReasoning model, its tokenizer, checkpoints and exports.

Importing it registers the merged export's model type ("fakereasoning") with
transformers' AutoConfig and AutoModel (modeling/checkpoints/hf_auto.py), so
`import modeling; AutoModel.from_pretrained("export/merged")` works without
trust_remote_code.
"""
from modeling.checkpoints.hf_auto import register as _register_auto_classes

_register_auto_classes()

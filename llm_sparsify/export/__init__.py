"""Writing pruned (and quantized) checkpoints in the formats that loaders and inference engines read."""

from llm_sparsify.errors import UserError


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported as asked (unquantized, inconsistent, unsupported here)."""


FORMATS = ("gguf", "compact", "compressed-tensors", "bnb-nf4", "bnb-fp4", "bnb-int8")  # what `export:` writes
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")  # the tensor types export/gguf.py writes
GGUF_TYPE = "Q8_0"  # the one it writes unless told

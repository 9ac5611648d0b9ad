"""Writing pruned (and quantized) checkpoints in the formats that loaders and inference engines read."""

from llm_sparsify.errors import UserError


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported as asked (unquantized, inconsistent, unsupported here)."""

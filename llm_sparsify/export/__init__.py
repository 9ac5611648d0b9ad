"""Writing pruned (and quantized) checkpoints in the formats that loaders and inference engines read."""


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (unquantized, inconsistent, unsupported here)."""

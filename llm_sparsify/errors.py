"""The base class of every error that bad input causes: the command line shows it as one line and exits 2."""


class UserError(Exception):
    """Input the tool cannot work with (recipe, data, model, output, device, ...), with the reason in words."""


class AllocationError(UserError, ValueError):
    """Per-layer sparsities that cannot be allocated as asked (prune/owl.py, prune/allocation.py)."""

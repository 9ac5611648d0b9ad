"""llm_sparsify: one-shot pruning of Hugging Face causal LMs, one decoder layer at a time."""

__version__ = "0.1.0"

from llm_sparsify.api import compress, prune_checkpoint  # noqa: E402
from llm_sparsify.evaluate import perplexity  # noqa: E402
from llm_sparsify.models import load_model  # noqa: E402
from llm_sparsify.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["Recipe", "compress", "load_model", "load_recipe", "perplexity", "prune_checkpoint", "__version__"]

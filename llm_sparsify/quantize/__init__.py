"""Weight quantization after (or jointly with) pruning: integer grids, round-to-nearest, GPTQ."""

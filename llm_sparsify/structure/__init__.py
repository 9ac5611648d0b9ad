"""Structured pruning with physical removal: whole decoder blocks (depth.py), attention heads and MLP channels
(width.py). The saved model is smaller, with a config that says so."""

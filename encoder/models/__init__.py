"""Flax linen models of the CLOC encoder (see encoder/CONTRACT.md for the param tree)."""

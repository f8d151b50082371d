"""The web chat: a stdlib HTTP server and one static page (no torch or jax at import)."""

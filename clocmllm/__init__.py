"""clocmllm: CLOC encoders (JAX) and region-aware LLaVA-style MLLMs (PyTorch)."""

__version__ = "0.1.0"

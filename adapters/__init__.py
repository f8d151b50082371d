"""The only place that knows both the JAX and the Hugging Face weight layouts."""

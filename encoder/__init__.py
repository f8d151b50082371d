"""JAX/Flax side: CLOC pretraining. Never imports torch."""

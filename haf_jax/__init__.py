"""haf_jax: reward models trained with the HaF hybrid objective, in JAX/Flax."""

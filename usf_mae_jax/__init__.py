"""usf_mae_jax: a JAX/Flax reimplementation of USF-MAE (arXiv 2510.22990)."""

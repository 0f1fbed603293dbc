"""Test configuration: float64 everywhere (accuracy checks); float32 tests set dtypes explicitly."""

import jax

jax.config.update("jax_enable_x64", True)

"""Test configuration: float64 everywhere (accuracy checks); float32 tests set dtypes explicitly."""

import jax

jax.config.update("jax_enable_x64", True)

# Scripts that tests start in a subprocess (e.g. on 8 simulated devices): importing them
# here, for doctests, would set their environment (XLA_FLAGS) in the test process.
collect_ignore = ["workers"]

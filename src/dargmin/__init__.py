"""dargmin: derivatives of the solutions of optimization problems, built on JAX."""

__version__ = "0.1.0"
__all__: list[str] = []

"""Drop-in replacements for other libraries' implicit-differentiation APIs.

* :mod:`dargmin.compat.jaxopt` — ``custom_root``, ``custom_fixed_point``, ``root_vjp`` and
  ``root_jvp`` with JAXopt's signatures and semantics, backed by dargmin's implicit
  differentiation: JAXopt code migrates by changing one import line, and gains forward
  mode, Hessians and dargmin's checks.
"""

from dargmin.compat import jaxopt

__all__ = ["jaxopt"]

"""The one registry of strategy names: strings accepted for backward compatibility.

``dargmin.hyper`` is configured by strategy objects (hypergradient methods such as
:class:`~dargmin.hyper.ImplicitSupport`, inner solvers such as
:class:`~dargmin.hyper.ProxCD`, outer optimizers such as
:class:`~dargmin.hyper.ProjectedGradientDescent`). The historical strings
(``method="implicit"``, ``solver="cd"``, ``optimizer="lbfgs"``...) are kept: each module
registers, next to its classes, a factory for each of its names in :data:`REGISTRY`, and
:func:`resolve` turns a string into the object. This module imports nothing from the
subpackage, so every other module can depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``{kind: {name: factory}}``; ``factory(problem, **options)`` returns the strategy object.
#: Kinds: ``"method"`` (hypergradient), ``"solver"`` (inner), ``"optimizer"`` (outer).
REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {"method": {}, "solver": {}, "optimizer": {}}

# The protocol each kind of object must follow (checked on user-supplied objects).
_PROTOCOL = {"method": "compute", "solver": "solve", "optimizer": "minimize"}


def register(kind: str, name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(problem, **options)`` under ``REGISTRY[kind][name]``."""
    REGISTRY[kind][name] = factory


def resolve(kind: str, spec: Any, problem: Any = None, **options: Any) -> Any:
    """Turn a strategy name into its object; objects are returned unchanged.

    Parameters
    ----------
    kind
        ``"method"``, ``"solver"`` or ``"optimizer"``.
    spec
        A registered name (see :data:`REGISTRY`) or an object with the kind's method
        (``compute``, ``solve`` or ``minimize``).
    problem
        The inner problem (``"auto"`` solver selection depends on it).
    **options
        Legacy keyword options read by the factories (e.g. ``tol_jac`` for
        ``"implicit_forward"``); ignored for objects.

    Examples
    --------
    >>> from dargmin import hyper
    >>> hyper.resolve("method", "implicit_forward", tol_jac=1e-8)
    ImplicitForward(tol=1e-08)
    >>> hyper.resolve("optimizer", "lbfgs")
    LBFGSB()
    """
    if kind not in REGISTRY:
        raise ValueError(f"Unknown strategy kind {kind!r}; choose from {sorted(REGISTRY)}.")
    if not isinstance(spec, str):
        attr = _PROTOCOL[kind]
        if not hasattr(spec, attr):
            raise TypeError(
                f"A {kind} must be one of the names {sorted(REGISTRY[kind])} or an object with "
                f"a .{attr} method; got {spec!r} ({type(spec).__name__})."
            )
        return spec
    table = REGISTRY[kind]
    if spec not in table:
        raise ValueError(
            f"Unknown {kind} {spec!r}; choose from {sorted(table)} or pass a {kind} object."
        )
    return table[spec](problem, **options)

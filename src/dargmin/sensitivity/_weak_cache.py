"""A cache keyed by callables that does not keep them alive.

The compiled code of :mod:`dargmin.sensitivity` is cached per ``loss`` / ``regularizer``;
``jax.jit`` would hold those functions (and their closures: data, models) forever. Here the
compiled kernels call the user's function through a weak reference (:class:`_WeakCall`) and
are themselves cached weakly by it (:class:`_FunctionCache`), so dropping a loss frees its
compiled code.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class _WeakCall:
    """Calls the user's function through a weak reference.

    The compiled kernels of a ``loss`` close over this instead of the function itself, so
    that they do not keep it alive (``jax.jit`` holds static arguments and closures
    strongly, forever). A function that cannot be weakly referenced is held.
    """

    __slots__ = ("_get",)
    _get: Callable[[], Any]

    def __init__(self, fn: Callable[..., Any]):
        self.point_to(fn)

    def point_to(self, fn: Callable[..., Any]) -> None:
        """Call ``fn`` from now on (an equal object found in the cache may be another one)."""
        if inspect.ismethod(fn):
            # A bound method is a new object at every attribute access: hold its owner
            # weakly (the function is the class's, alive anyway).
            try:
                owner = weakref.ref(fn.__self__)
            except TypeError:
                pass
            else:
                func = fn.__func__
                self._get = lambda: None if (o := owner()) is None else types.MethodType(func, o)
                return
        try:
            self._get = weakref.ref(fn)
        except TypeError:
            self._get = lambda: fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._get()
        if fn is None:  # pragma: no cover - the caller holds the function while it runs
            raise RuntimeError("dargmin.sensitivity: the loss was garbage-collected in use.")
        return fn(*args, **kwargs)


class _FunctionCache:
    """``callable -> value`` that does not keep the callable alive.

    Hashable callables are matched by equality, as ``jax.jit`` matches static arguments;
    unhashable ones by identity; bound methods by (owner identity, function), as Python
    compares them. The entry goes when the callable is garbage-collected. Callables that
    cannot be weakly referenced are kept, at most ``max_pinned`` of them (least recently
    used out).
    """

    def __init__(self, max_pinned: int = 32):
        self._by_value: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_identity: dict[int, tuple[weakref.ref, Any]] = {}
        self._pinned: OrderedDict = OrderedDict()
        self._max_pinned = max_pinned

    def get(self, fn: Any, make: Callable[[], Any]) -> Any:
        if inspect.ismethod(fn):
            per_function = self._get_by_identity(fn.__self__, dict)
            if per_function is not None:
                if fn.__func__ not in per_function:
                    per_function[fn.__func__] = make()
                return per_function[fn.__func__]
        else:
            try:
                value = self._by_value.get(fn)
            except TypeError:  # unhashable, or not weakly referenceable
                value = self._get_by_identity(fn, make)
            else:
                if value is None:
                    value = self._by_value[fn] = make()
            if value is not None:
                return value
        try:
            value = self._pinned.pop(fn)
        except KeyError:
            value = make()
        except TypeError:  # neither hashable nor weakly referenceable: nothing to key on
            return make()
        self._pinned[fn] = value
        while len(self._pinned) > self._max_pinned:
            self._pinned.popitem(last=False)
        return value

    def _get_by_identity(self, obj: Any, make: Callable[[], Any]) -> Any:
        """The value of ``obj`` (by identity); ``None`` if ``obj`` has no weak references."""
        key = id(obj)
        entry = self._by_identity.get(key)
        if entry is not None and entry[0]() is obj:
            return entry[1]

        def forget(ref: weakref.ref, key: int = key) -> None:
            if self._by_identity.get(key, (None,))[0] is ref:
                del self._by_identity[key]

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return None
        value = make()
        self._by_identity[key] = (ref, value)
        return value

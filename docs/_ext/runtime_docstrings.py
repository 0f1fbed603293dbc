"""Griffe extension for the API reference: docstrings assembled at import time.

Some classes (the ``dargmin.hyper`` estimators) build their docstring by concatenating a
shared parameter section, which static analysis cannot evaluate. For a class or function
that static analysis leaves without a docstring, this extension imports it and uses the
runtime ``__doc__``. Everything else is read statically (which honours ``__all__``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    """Fill in missing docstrings of classes and functions from the imported object."""

    def _fill(self, obj: griffe.Object) -> None:
        if obj.docstring is not None or not obj.path.startswith("dargmin."):
            return
        module_path, _, name = obj.path.rpartition(".")
        try:
            runtime = getattr(importlib.import_module(module_path), name)
        except (ImportError, AttributeError):
            return  # a method or a name that only exists statically: leave it alone
        if getattr(runtime, "__module__", None) != module_path:
            return
        # The object's own docstring: inspect.getdoc would return an inherited one.
        own = vars(runtime).get("__doc__") if inspect.isclass(runtime) else runtime.__doc__
        if isinstance(own, str) and own.strip():
            obj.docstring = griffe.Docstring(inspect.cleandoc(own), parent=obj)

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        self._fill(cls)

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        self._fill(func)

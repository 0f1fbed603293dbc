"""JAX's persistent compilation cache for the hypergradient estimators' first fit.

The estimators compile one batched support solve per bucketed support size (16, 64,
256... features); in a fresh process a first fit pays that compilation (1-4 s on a
loaded 2-core machine). JAX can keep compiled executables on disk and reload them in later
processes: :func:`enable_compilation_cache` turns that on (it is a global JAX setting, so
it is never switched on implicitly).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache, keeping every compiled function.

    Parameters
    ----------
    path
        Cache directory (created if missing). Default: ``$DARGMIN_CACHE_DIR`` or
        ``~/.cache/dargmin/jax``.

    Returns
    -------
    pathlib.Path
        The cache directory.

    Notes
    -----
    Sets ``jax_compilation_cache_dir`` and lowers JAX's thresholds
    (``jax_persistent_cache_min_compile_time_secs = 0``,
    ``jax_persistent_cache_min_entry_size_bytes = 0``) so that the small, quick-to-run but
    slow-to-compile support solves are kept. Tracing still runs in each process; only the
    XLA compilation is skipped.

    Examples
    --------
    Once per process, before the first fit (a global setting, so not run here):

    >>> from dargmin.hyper import enable_compilation_cache
    >>> enable_compilation_cache()  # doctest: +SKIP
    PosixPath('/home/me/.cache/dargmin/jax')
    """
    if path is None:
        default = Path.home() / ".cache" / "dargmin" / "jax"
        path = os.environ.get("DARGMIN_CACHE_DIR", default)
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(out))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return out

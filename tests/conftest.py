"""Test configuration: float64 everywhere (accuracy checks); float32 tests set dtypes explicitly."""

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import pytest
from filelock import FileLock

jax.config.update("jax_enable_x64", True)

# Scripts that tests start in a subprocess (e.g. on 8 simulated devices): importing them
# here, for doctests, would set their environment (XLA_FLAGS) in the test process.
collect_ignore = ["workers"]


def _run_worker_once(worker: Path, base_temp: Path) -> dict[str, Any]:
    """The JSON the script ``worker`` prints, from one run shared by all pytest-xdist workers.

    A module-scoped fixture runs once per xdist process that draws one of the module's
    tests, so each 20-40 s worker script would run on both processes; a file lock and a
    cache file in the session's shared temporary directory make it run once. The script
    inherits this process's environment (the test XLA options of the root conftest.py) and
    sets its own device count.
    """
    cache = base_temp / f"{worker.stem}.json"
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            run = subprocess.run(
                [sys.executable, str(worker)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            cache.write_text(run.stdout.strip().splitlines()[-1])
    return json.loads(cache.read_text())


@pytest.fixture(scope="session")
def shared_temp(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A directory every xdist process of this session sees (its own one without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def run_worker(shared_temp: Path) -> Callable[..., dict[str, Any]]:
    """``run_worker(script)``: the JSON a worker script prints, run once a session."""
    return functools.partial(_run_worker_once, base_temp=shared_temp)

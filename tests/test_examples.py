"""The worked examples and the README's code run.

* Every ``examples/*.py`` runs in a subprocess with ``DARGMIN_FAST=1`` (smaller problems,
  fewer iterations where a script is slow) and must exit with status 0. Outputs that an
  example writes go to ``DARGMIN_OUTPUT_DIR`` (a temporary directory here).
* The ```` ```python ```` blocks of README.md run in order, in one namespace, in a subprocess;
  a block that contains a line ``# not run`` is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300  # per script; each takes well under a minute in fast mode on 2 cores
NOT_RUN = "# not run"


def _env(output_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DARGMIN_FAST="1", DARGMIN_OUTPUT_DIR=str(output_dir), MPLBACKEND="Agg")
    return env


def _run(args: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],  # the interpreter running the tests: the venv's python
        cwd=ROOT,
        env=_env(output_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _explain(result: subprocess.CompletedProcess) -> str:
    return (
        f"exit status {result.returncode}\n--- stdout (end) ---\n{result.stdout[-4000:]}"
        f"\n--- stderr (end) ---\n{result.stderr[-4000:]}"
    )


def test_examples_are_found():
    assert len(EXAMPLES) >= 7, EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(script: Path, tmp_path: Path):
    result = _run([str(script.relative_to(ROOT))], tmp_path)
    assert result.returncode == 0, f"{script.name}: {_explain(result)}"


def readme_python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```` ```python ```` block of a Markdown text."""
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.M):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((first_line, match.group(1)))
    return blocks


# Runs the blocks with their README line numbers, so a traceback points into README.md.
_README_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for first_line, code in json.loads(sys.argv[1]):
    exec(compile("\\n" * (first_line - 1) + code, "README.md", "exec"), namespace)
    print(f"README.md: block at line {first_line} ran", flush=True)
"""


def test_readme_code_blocks_run(tmp_path: Path):
    blocks = readme_python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no python code block"
    runnable = [
        (line, code)
        for line, code in blocks
        if not any(row.strip() == NOT_RUN for row in code.splitlines())
    ]
    result = _run(["-c", _README_RUNNER, json.dumps(runnable)], tmp_path)
    assert result.returncode == 0, f"README.md code blocks: {_explain(result)}"

"""Every Python snippet in README.md runs as written, each in a fresh interpreter in an empty
directory (a reader copies them one at a time)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code, tmp_path):
    # (under xdist the snippet gets this worker's share of the cores: OMP_NUM_THREADS, tests/conftest.py)
    env = {**os.environ, "PYTHONPATH": str(README.parent), "INCUBATION_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"

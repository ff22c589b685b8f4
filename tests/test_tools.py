"""The ad-hoc scripts in tools/ import the project as a user's script would, from any directory."""

import subprocess
import sys

import pytest
from conftest import REPO, SUBPROCESS_ENV

TOOLS = sorted(path.name for path in (REPO / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_imports_and_shows_its_usage(tool, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), "--help"],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_kv_cache_table_matches_the_model(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "kv_cache.py")],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # the defaults: 27 of GPT-2 small's 144 head caches left out, 12 layers x 12 heads x 64 x 2 (K, V) x 2 bytes
    assert "| small | plain | | 0 | 36,864 | 1 |" in done.stdout
    assert "| small | 9 | 0.75 | 9 of 12 | 29,952 | 0.8125 |" in done.stdout

"""bench/gpu_check.sh with a python that has no torch: one line, exit 2, nothing written (issue 20,
case 9: a bare python3 without torch gave six tracebacks)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO


def test_gpu_check_without_torch_is_one_line(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("needs a system python3 without torch")
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": bare, "GPU_CHECK_OUT": str(tmp_path / "out")})
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        f"gpu_check: {bare} cannot import torch: run 'make install' (it makes .venv), or set PYTHON to a python "
        f"that has the requirements installed"], res.stderr
    assert "Traceback" not in res.stdout + res.stderr and not (tmp_path / "out").exists()

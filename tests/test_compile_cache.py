"""A torch.compile cache written under the native CPU kernel path is not reused under
ATEN_CPU_CAPABILITY=default (engines/compile_cache.py says why that fails)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from tests.conftest import ROOT

# Softmax of a row sum: inductor emits vectorised C++ (at::vec) for it on AVX2/AVX512.
SCRIPT = """
import sys, torch
if sys.argv[1] == "keyed":
    from engines.compile_cache import keyed_inductor_cache
    keyed_inductor_cache()
f = torch.compile(lambda x: (x * x).sum(-1).softmax(-1))
print("sum", f(torch.randn(64, 256)).sum().item())
"""


def _run(tmp_path, capability: str | None, mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))  # inductor's default dir lives under TMPDIR
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no vector kernel path here")
def test_default_capability_after_native_compile(tmp_path):
    native = _run(tmp_path, None, "keyed")
    assert native.returncode == 0, native.stderr[-2000:]
    forced = _run(tmp_path, "default", "keyed")
    assert forced.returncode == 0, forced.stderr[-2000:]
    # A softmax over the 64 row sums adds up to 1; summing 64 float32 values in [0, 1] rounds by at
    # most 64 * 2^-24 = 4e-6 (Higham, s. 4.2), the softmax itself a few ulps more: 1e-5.
    assert abs(float(forced.stdout.split()[-1]) - 1.0) < 1e-5
    user_dir = Path(default_cache_dir()).name  # torchinductor_<user>, under TMPDIR = tmp_path
    assert {p.name for p in (tmp_path / user_dir).iterdir()} >= {
        f"cpu-{torch.backends.cpu.get_cpu_capability()}",
        "cpu-DEFAULT",
    }

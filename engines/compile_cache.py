"""Inductor's compile cache, one per ATen CPU kernel path.

torch.compile (vLLM-CPU compiles its model with it) caches generated C++ under one directory
(`TORCHINDUCTOR_CACHE_DIR`, default `<tmp>/torchinductor_<user>`) whose keys do not include the
CPU capability ATen runs with. Code generated under the native path (AVX2, AVX512) includes
`at::vec` calls; a later process forced to `ATEN_CPU_CAPABILITY=default` finds that entry and
rebuilds it without the vector headers, failing with "'at::vec' has not been declared"
(seen with torch 2.13 CPU; tests/test_compile_cache.py reproduces it). vLLM-CPU 0.32 keeps no
compile cache of its own (`compilation_config.cache_dir` stays unused on CPU), so inductor's is
the only one to separate.
"""

from __future__ import annotations

import os


def keyed_inductor_cache() -> dict[str, str]:
    """Set TORCHINDUCTOR_CACHE_DIR to inductor's default directory + `/cpu-<capability>` unless the
    user set one (theirs is kept as given), and return it as an environment entry for workers
    (Ray runtime_env). The capability is torch's (`torch.backends.cpu.get_cpu_capability()`:
    DEFAULT, AVX2, AVX512, ...), which honours ATEN_CPU_CAPABILITY."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import torch
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        cap = torch.backends.cpu.get_cpu_capability()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"cpu-{cap}")
    return {"TORCHINDUCTOR_CACHE_DIR": os.environ["TORCHINDUCTOR_CACHE_DIR"]}

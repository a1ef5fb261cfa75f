"""Build the random-init Qwen2 models the benchmarks use (once; GPU init when there is a GPU).

    python benchmarks/build_models.py [0.5b 1.5b 7b] [--models-dir DIR] [--gsm8k DIR]

Needs only torch, transformers, tokenizers, pandas (no vLLM). Same layout as
engines.models.materialize(source='random'), so the flow reuses them (model.path=DIR/random-qwen2-ARCH).
"""

import argparse
import time

import _common as C

p = argparse.ArgumentParser()
p.add_argument("archs", nargs="*", default=["0.5b", "1.5b", "7b"])
p.add_argument("--models-dir", default=None)
p.add_argument("--gsm8k", default=C.default_gsm8k())
a = p.parse_args()
for arch in a.archs:
    t = time.perf_counter()
    path = C.ensure_random_model(arch, C.model_dir_for(arch, a.models_dir), a.gsm8k)
    print(f"[model] {arch}: {path} ready after {time.perf_counter() - t:.1f} s", flush=True)

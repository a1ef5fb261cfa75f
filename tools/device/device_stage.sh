#!/usr/bin/env bash
# Stages the Python packages the GRPO pipeline needs at run time on the lent GPU machine, whose
# image (Python 3.12, torch 2.11 + CUDA 13, transformers, peft, pandas, pyarrow, pyyaml, ...) has
# no vLLM, Ray, Prefect or MLflow and which has no network; one device call carries <= 64 MiB.
#
# Two bundles, each a tar.xz split into chunks of at most 55 MB (55,000,000 bytes):
#   .device/vllm/   vLLM 0.26.0 and the small packages it needs that the image lacks, packed as
#                   ../shared/tools/device-vllm/prepare.sh packs them (same wheel list, platforms
#                   and removed files; done here rather than by calling it so that the wheels are
#                   cached), with the two overrides below (VLLM_OVERRIDES)              -> /root/vsite
#   .device/extra/  ray, prefect, mlflow-skinny (+ sqlalchemy/alembic for a sqlite:/// store),
#                   gguf, liger-kernel and what they need that neither the image nor the vLLM bundle has,
#                   pinned in tools/device/device_requirements.txt; Ray's Java jar and Prefect's
#                   web-UI builds are left out (see build_bundle)                       -> /root/xsite
# No distribution is in both bundles, and none of the extras is one the image already has.
# Wheels are kept in .device/cache/ so a re-run downloads nothing new; a bundle whose pins did
# not change and whose chunks are intact is not rebuilt (--force rebuilds).
#
# Usage, from anywhere in the repo (needs pip and network here, not there):
#   tools/device/device_stage.sh            build what is missing or stale, verify, print the device calls
#   tools/device/device_stage.sh --resolve  re-resolve the extras with pip first and rewrite
#                                           tools/device/device_requirements.txt
#   tools/device/device_stage.sh --force    rebuild both bundles
#   tools/device/device_stage.sh --calls    only print the device calls for the chunks already built
# On the machine, tools/device/device_env.sh unpacks the chunks copied to /root/st and sets the env.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
PY=${PYTHON:-python3}                       # any local Python with pip; it only downloads/unpacks
tool=${DEVICE_VLLM_TOOL:-}
if [ -z "$tool" ]; then
  for t in "$root/shared/tools/device-vllm" "$root/../shared/tools/device-vllm"; do
    [ -f "$t/requirements-device.txt" ] && { tool=$(cd "$t" && pwd); break; }
  done
fi
[ -n "$tool" ] && [ -f "$tool/requirements-device.txt" ] || {
  echo "device_stage: cannot find shared/tools/device-vllm (set DEVICE_VLLM_TOOL)" >&2; exit 1; }

REQ=tools/device/device_requirements.txt
DEV=.device
CACHE=$DEV/cache
CHUNK_BYTES=55000000                        # <= 55 MB (and < 55 MiB): one chunk per call

VLLM_SPEC=vllm==0.26.0
# One version of each package across both bundles. prefect 3.7.7 needs websockets<17 and
# cachetools<8, mlflow-skinny 3.17.2 cachetools<8; in the vLLM bundle nothing asks for more than
# that (vllm: `cachetools`, uvicorn[standard]: websockets>=13), so the vLLM bundle carries these
# instead of requirements-device.txt's cachetools==8.0.1 and websockets==17.4.
VLLM_OVERRIDES=(cachetools==7.3.2 websockets==16.1.1)
# What the project needs beyond vLLM (sqlalchemy + alembic: mlflow's sqlite:/// tracking store).
# liger-kernel: model.use_liger / model.use_fused_kernels (engines/trainer/liger.py); a py3 wheel
# needing only torch and triton, which the image has.
EXTRA_TOP=(ray==2.60.0 prefect==3.7.7 mlflow-skinny==3.17.2 sqlalchemy alembic gguf liger-kernel==0.8.5)
# Versions the image is known to have (device docs' pip list), used as constraints when resolving.
IMAGE_PINS=(torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 triton==3.6.0 numpy==2.5.2
  transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 huggingface-hub==1.33.0
  accelerate==1.15.0 sentencepiece==0.2.2 tiktoken==0.14.0 jax==0.11.2 jaxlib==0.11.2
  onnx==1.23.1 onnxruntime==1.30.0)
# Every Python distribution of the machine's image ('cuda'), as the device docs list it
# (read on 2026-11-17): never carried.
IMAGE_PKGS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"

# Same platform tags as prepare.sh.
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform any --platform linux_x86_64
      --platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 5 12 17 24 27 28 31 34 35 38 39; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-stage.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# pip, without the noise of this machine's file:// index settings; keeps pip's exit status.
pipq() {
  local rc=0
  "$PY" -m pip "$@" >"$WORK/pip.log" 2>&1 || rc=$?
  grep -v -E "is ignored: it is neither a file nor a directory|Running pip as the 'root' user" "$WORK/pip.log" || true
  return $rc
}

resolve=0 force=0 calls_only=0
for a in "$@"; do
  case $a in
    --resolve) resolve=1 ;; --force) force=1 ;; --calls) calls_only=1 ;;
    -h|--help) sed -n '2,25p' "$root/tools/device/device_stage.sh"; exit 0 ;;
    *) echo "device_stage: unknown argument $a" >&2; exit 2 ;;
  esac
done
mkdir -p "$DEV/vllm" "$DEV/extra" "$CACHE"

# ---------------------------------------------------------------- helpers
# name==version pins of the vLLM bundle: vllm + requirements-device.txt with the overrides.
vllm_pins() {
  echo "$VLLM_SPEC"
  "$PY" - "$tool/requirements-device.txt" "${VLLM_OVERRIDES[@]}" <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
over = {norm(s.split("==")[0]): s for s in sys.argv[2:]}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    n = norm(re.split(r"[=<>!~;\[ ]", line, 1)[0])
    print(over.pop(n, line))
for s in over.values():
    print(s)
EOF
}

# Checks the chunks of a bundle against its SHA256SUMS; 0 if all there and intact.
chunks_ok() {
  local d=$1
  [ -f "$d/SHA256SUMS" ] && [ -s "$d/SHA256SUMS" ] && (cd "$d" && sha256sum --quiet -c SHA256SUMS) >/dev/null 2>&1
}

# build_bundle NAME SITE REQFILE: download (cached) wheels, install --no-deps --target, pack, split.
build_bundle() {
  local name=$1 site=$2 reqfile=$3 out=$DEV/$1 wheels=$CACHE/$1-wheels
  local stamp; stamp=$( (cat "$reqfile"; echo "$CHUNK_BYTES v2"; if [ "$name" = extra ]; then echo "prune 2"; fi) | sha256sum | cut -c1-16)
  if [ $force = 0 ] && [ "$(cat "$out/STAMP" 2>/dev/null)" = "$stamp" ] && chunks_ok "$out"; then
    echo "[$name] up to date ($(ls "$out" | grep -cE '^c[0-9]+of[0-9]+$') chunks, stamp $stamp)"; return 0
  fi
  echo "[$name] downloading wheels into $wheels (already there are reused) ..."
  mkdir -p "$wheels"
  pipq download -q --no-deps -d "$wheels" "${plat[@]}" -r "$reqfile"
  local work=$WORK/$name
  rm -rf "$work"; mkdir -p "$work"
  echo "[$name] installing into $site (--no-deps --target) ..."
  pipq install -q --no-deps --no-compile --no-index --find-links "$wheels" --target "$work/$site" \
    "${plat[@]}" -r "$reqfile"
  if [ "$name" = vllm ]; then
    # As prepare.sh: not needed on Hopper, or not needed offline.
    rm -f "$work/$site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$work/$site/vllm/vllm-rs"
    rm -rf "$work/$site/vllm/third_party/fmha_sm100"
    rm -f "$work"/$site/vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
  fi
  if [ "$name" = extra ]; then
    # Ray's Java-worker jar (34 MB, hardly compressible; without ray/jars Ray simply starts no Java
    # workers: ray/_private/services.py checks for the folder) and the dashboard's JavaScript
    # source maps: not needed for Python-only Ray.
    rm -rf "$work/$site/ray/jars"
    find "$work/$site/ray/dashboard" -name '*.js.map' -delete
    # Prefect's two web-UI builds (55 MB): only `prefect server start` serves them, and
    # prefect/server/api/server.py skips a UI whose folder is missing.
    rm -rf "$work/$site/prefect/server/ui" "$work/$site/prefect/server/ui-v2"
  fi
  # Console scripts were written for this machine's Python: point them at the machine's python3.
  if [ -d "$work/$site/bin" ]; then
    for f in "$work/$site"/bin/*; do
      [ -f "$f" ] && head -c 2 "$f" | grep -q '#!' && sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$f"
    done
  fi
  { echo "# $name bundle, stamp $stamp, built $(date -u +%FT%TZ) by tools/device/device_stage.sh"; grep -v '^#' "$reqfile" | sed '/^$/d'; } \
    > "$work/$site/BUNDLE.txt"
  echo "[$name] unpacked size: $(du -sh "$work/$site" | cut -f1); compressing (xz -6, a few minutes on 2 cores) ..."
  tar --sort=name --owner=0 --group=0 -cf - -C "$work" "$site" | xz -6 -T0 > "$work/$site.tar.xz"
  rm -f "$out"/c* "$out/SHA256SUMS" "$out/STAMP"
  split -b "$CHUNK_BYTES" -d -a 2 "$work/$site.tar.xz" "$work/part."
  local parts=("$work"/part.*) i=0 n
  n=${#parts[@]}
  for p in "${parts[@]}"; do mv "$p" "$out/c${i}of${n}"; i=$((i+1)); done
  (cd "$out" && sha256sum c*of* > SHA256SUMS)
  cp "$reqfile" "$out/requirements.txt"
  echo "$stamp" > "$out/STAMP"
  echo "[$name] $(stat -c %s "$work/$site.tar.xz") bytes in $n chunks"
  rm -rf "$work"
}

# ---------------------------------------------------------------- 1. extras: resolve (optional)
if [ $calls_only = 0 ] && { [ $resolve = 1 ] || ! grep -q '^[A-Za-z0-9]' "$REQ" 2>/dev/null; }; then
  echo "[resolve] pip download (with dependencies) of: ${EXTRA_TOP[*]}"
  { vllm_pins; printf '%s\n' "${IMAGE_PINS[@]}"; } > "$CACHE/constraints.txt"
  rdir=$CACHE/resolve-wheels; rm -rf "$rdir"; mkdir -p "$rdir" "$CACHE/extra-wheels"
  pipq download -q -d "$rdir" "${plat[@]}" -c "$CACHE/constraints.txt" "${EXTRA_TOP[@]}"
  "$PY" - "$rdir" "$REQ" "$CACHE/constraints.txt" "$IMAGE_PKGS" "${EXTRA_TOP[*]}" "${VLLM_OVERRIDES[*]}" \
      "$CACHE/extra-wheels" <<'EOF'
import datetime, os, re, shutil, sys
rdir, req, cons, image, top, over, keepdir = sys.argv[1:8]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = set(image.split())
vb = {}
for l in open(cons):
    l = l.split("#")[0].strip()
    if "==" in l:
        n, v = l.split("==", 1); vb[norm(n)] = v.strip()
img_pins = {k for k in vb if k in image}
vb = {k: v for k, v in vb.items() if k not in image}        # the vLLM bundle's pins
got = {}
for f in sorted(os.listdir(rdir)):
    if not f.endswith(".whl"):
        sys.exit(f"not a wheel: {f}")
    n, v = f.split("-")[:2]
    got[norm(n)] = (v, f)
keep, from_img, from_vb = [], [], []
for n, (v, f) in sorted(got.items()):
    if n in image or n.startswith("nvidia-"):
        from_img.append(f"{n}=={v}")
    elif n in vb:
        if vb[n] != v:
            sys.exit(f"{n}: resolved {v} but the vLLM bundle has {vb[n]}")
        from_vb.append(f"{n}=={v}")
    else:
        keep.append(f"{n}=={v}")
        shutil.copy2(os.path.join(rdir, f), keepdir)   # so the build downloads nothing again
wrap = lambda items: "\n".join("#   " + " ".join(items[i:i + 8]) for i in range(0, len(items), 8))
with open(req, "w") as fh:
    fh.write(f"""# Extra Python packages carried to the GPU machine and unpacked into /root/xsite, beside vLLM's
# bundle in /root/vsite (cp312, manylinux x86_64). Made by `tools/device/device_stage.sh --resolve` on
# {datetime.date.today()}: `python3 -m pip download --only-binary=:all: --python-version 3.12
# --implementation cp --platform any/linux_x86_64/manylinux1/manylinux2014/manylinux_2_{{5..39}}_x86_64`
# WITH dependency resolution of
#   {top}
# constrained to the vLLM bundle's pins (vllm==0.26.0 + shared/tools/device-vllm/requirements-device.txt,
# there with {over} because prefect 3.7.7 needs websockets<17 and cachetools<8)
# and to the image's known versions; then every package the image has or the vLLM bundle ships
# was dropped, so no distribution is installed twice. Edit by re-running with --resolve.
# Taken from the image, not carried ({len(from_img)}; the image's own versions are used there):
{wrap(from_img)}
# Taken from the vLLM bundle, not carried ({len(from_vb)}):
{wrap(from_vb)}
# Carried ({len(keep)}):
""")
    fh.write("\n".join(keep) + "\n")
print(f"[resolve] {len(got)} resolved: {len(keep)} carried, {len(from_img)} from the image, {len(from_vb)} from the vLLM bundle -> {req}")
EOF
  rm -rf "$rdir"
fi

# ---------------------------------------------------------------- 2. build both bundles
if [ $calls_only = 0 ]; then
  vllm_pins > "$CACHE/vllm-requirements.txt"
  build_bundle vllm vsite "$CACHE/vllm-requirements.txt"
  build_bundle extra xsite "$REQ"

  # ------------------------------------------------------------ 3. verify the chunks themselves
  echo "[verify] listing the tarballs from their chunks ..."
  "$PY" - "$DEV" "$CHUNK_BYTES" "$IMAGE_PKGS" <<'EOF'
import io, os, re, subprocess, sys, tarfile
dev, limit, image = sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
fail = []
def chunks(b):
    d = os.path.join(dev, b)
    cs = sorted((f for f in os.listdir(d) if re.fullmatch(r"c\d+of\d+", f)), key=lambda f: int(f[1:].split("of")[0]))
    return [os.path.join(d, c) for c in cs]
info = {}
for b, site, must in (("vllm", "vsite", ["vllm", "pydantic", "fastapi", "cachetools", "websockets"]),
                      ("extra", "xsite", ["ray", "prefect", "mlflow", "sqlalchemy", "alembic", "gguf", "liger_kernel"])):
    cs = chunks(b)
    n = int(os.path.basename(cs[0]).split("of")[1])
    if len(cs) != n:
        fail.append(f"{b}: {len(cs)} chunks, names say {n}")
    sizes = [os.path.getsize(c) for c in cs]
    for c, s in zip(cs, sizes):
        if s > limit:
            fail.append(f"{c}: {s} bytes > {limit}")
    cat = subprocess.Popen(["cat", *cs], stdout=subprocess.PIPE)
    xz = subprocess.Popen(["xz", "-dc", "-T0"], stdin=cat.stdout, stdout=subprocess.PIPE)
    names = []
    with tarfile.open(fileobj=xz.stdout, mode="r|") as tf:
        for m in tf:
            names.append(m.name)
    if xz.wait() or cat.wait():
        fail.append(f"{b}: the chunks do not decompress")
    top = sorted({p.split("/")[1] for p in names if p.count("/") >= 1 and p.split("/")[1]})
    dists = {}
    for t in top:
        if t.endswith(".dist-info"):
            n_, v = t[:-len(".dist-info")].rsplit("-", 1)
            dists[norm(n_)] = v
    mods = {t for t in top if not t.endswith((".dist-info", ".data")) and t not in ("bin", "BUNDLE.txt")}
    for m in must:
        if m not in mods:
            fail.append(f"{b}: no top-level {m}/ in the tarball")
    inits = {p.split("/")[1] for p in names if p.count("/") == 2 and p.endswith("/__init__.py")}
    info[b] = dict(chunks=cs, sizes=sizes, dists=dists, mods=mods, inits=inits, files=len(names))
    print(f"  {b}: {len(cs)} chunks {sizes} = {sum(sizes)} bytes, {len(dists)} distributions, {len(names)} entries")
    print(f"    top-level: {' '.join(sorted(m for m in mods if not m.endswith(('.py', '.so', '.pth', '.txt')))[:400])}")
v, x = info["vllm"], info["extra"]
both = sorted(set(v["dists"]) & set(x["dists"]))
if both:
    fail.append("distributions in both bundles: " + " ".join(both))
shared = sorted(v["mods"] & x["mods"])
for m in shared:
    if m in v["inits"] or m in x["inits"] or m.endswith((".py", ".so")):
        fail.append(f"top-level {m} is in both bundles and is not a namespace package")
if shared:
    print("  folders in both bundles, none with an __init__.py (namespace packages / headers, fine): " + " ".join(shared))
for b in info:
    dup = sorted(d for d in info[b]["dists"] if d in image)
    if dup:
        fail.append(f"{b}: carries packages the image has: {' '.join(dup)}")
    req = os.path.join(dev, b, "requirements.txt")
    want = {}
    for l in open(req):
        l = l.split("#")[0].strip()
        if "==" in l:
            n_, ver = l.split("==", 1); want[norm(n_)] = ver.strip()
    if want != info[b]["dists"]:
        fail.append(f"{b}: installed distributions differ from {req}: "
                    f"missing {sorted(set(want) - set(info[b]['dists']))} extra {sorted(set(info[b]['dists']) - set(want))}")
total = sum(v["sizes"]) + sum(x["sizes"])
print(f"  no distribution in both bundles: {'yes' if not both else 'NO'}; total {total} bytes "
      f"({total / 2**20:.1f} MiB) in {len(v['sizes']) + len(x['sizes'])} chunks")
if fail:
    print("[verify] FAILED:\n  " + "\n  ".join(fail)); sys.exit(1)
print("[verify] ok")
EOF
fi

# ---------------------------------------------------------------- 4. the device calls
mapfile -t vch < <(ls "$DEV/vllm" | grep -E '^c[0-9]+of[0-9]+$' | sort -V)
mapfile -t xch < <(ls "$DEV/extra" | grep -E '^c[0-9]+of[0-9]+$' | sort -V)
[ ${#vch[@]} -gt 0 ] && [ ${#xch[@]} -gt 0 ] || { echo "device_stage: no chunks built yet" >&2; exit 1; }
all=(); for c in "${vch[@]}"; do all+=("vllm/$c"); done; for c in "${xch[@]}"; do all+=("extra/$c"); done
total=$(cat "${all[@]/#/$DEV/}" | wc -c)
echo
echo "Device calls: ${#all[@]} chunks, $total bytes; one call per chunk, back to back (the machine"
echo "is given back 30 s after a call; if it was, start again from call 1):"
k=0
for c in "${all[@]}"; do
  k=$((k+1)); b=${c%%/*}
  cmd="mkdir -p /root/st/$b && cp $DEV/$c /root/st/$b/"
  [ $k = ${#all[@]} ] && cmd="$cmd && source tools/device/device_env.sh && <your command>"
  printf '  call %d: carry ["%s"]  command: %s\n' $k "$DEV/$c" "$cmd"
done
cat <<MSG
The last call's 'source tools/device/device_env.sh' unpacks /root/st/vllm/c* into /root/vsite and
/root/st/extra/c* into /root/xsite (about the same as
  cd /root && cat st/vllm/c* | tar -xJf - && cat st/extra/c* | tar -xJf - && cd - && export PYTHONPATH=/root/vsite:/root/xsite:\$PWD),
exports the run-time environment, and checks the imports once. Later calls on the same warm
machine need only: source tools/device/device_env.sh && <your command>
MSG

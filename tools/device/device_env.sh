# Run-time environment of the GPU machine. Source it from the repo root in a device command:
#     source tools/device/device_env.sh && <your command>
# It unpacks the bundles whose chunks tools/device/device_stage.sh's calls copied to /root/st/<bundle>/
# (vllm -> /root/vsite, extra -> /root/xsite) once all chunks of a bundle are there and it was not
# unpacked yet, exports the environment below, and the first time (or with DEVICE_ENV_CHECK=1;
# DEVICE_ENV_CHECK=0 skips it) imports the main packages and prints their versions, plus any
# requirement of a carried extra that the machine does not meet (DEVICE_ENV_VERBOSE=1: also those
# of the vLLM bundle). Returns non-zero when a bundle is missing or a required import fails, so
# `source tools/device/device_env.sh && cmd` then does not run cmd.

_device_env_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_R=${DEVICE_ENV_ROOT:-/root}        # only for trying this script elsewhere; /root on the machine

# _device_env_unpack BUNDLE SITE: 0 when /root/SITE is ready (now or before), 1 otherwise.
_device_env_unpack() {
  local b=$1 site=$2 dir=$_R/st/$1 n i t0 files=()
  [ -f "$_R/$site/.unpacked" ] && return 0
  n=$(ls "$dir" 2>/dev/null | sed -n 's/^c[0-9]*of\([0-9]*\)$/\1/p' | sort -u)
  if [ -z "$n" ]; then echo "device_env: no chunks of '$b' in $dir: stage first (tools/device/device_stage.sh prints the calls)" >&2; return 1; fi
  if [ "$(echo "$n" | wc -l)" != 1 ]; then echo "device_env: chunks of different builds in $dir: $(ls "$dir" | tr '\n' ' ')" >&2; return 1; fi
  for ((i = 0; i < n; i++)); do
    [ -f "$dir/c${i}of$n" ] || { echo "device_env: $dir/c${i}of$n is missing (not carried yet?)" >&2; return 1; }
    files+=("$dir/c${i}of$n")
  done
  t0=$SECONDS
  rm -rf "$_R/.unpack-$site" && mkdir -p "$_R/.unpack-$site"
  if cat "${files[@]}" | tar -xJf - -C "$_R/.unpack-$site" && [ -d "$_R/.unpack-$site/$site" ]; then
    rm -rf "$_R/$site" && mv "$_R/.unpack-$site/$site" "$_R/$site" && rm -rf "$_R/.unpack-$site"
    touch "$_R/$site/.unpacked"
    echo "device_env: unpacked $n chunks of '$b' into $_R/$site in $((SECONDS - t0)) s"
    _device_env_fresh=1
  else
    rm -rf "$_R/.unpack-$site"
    echo "device_env: unpacking $dir failed (truncated or mixed chunks?): copy them again" >&2
    return 1
  fi
}

_device_env_main() {
  local ok=0
  _device_env_fresh=0
  _device_env_unpack vllm vsite || ok=1
  _device_env_unpack extra xsite || ok=1

  export PYTHONPATH=$_R/vsite:$_R/xsite:$_device_env_repo
  case ":$PATH:" in *:$_R/xsite/bin:*) ;; *) export PATH=$PATH:$_R/vsite/bin:$_R/xsite/bin ;; esac
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  # NVLink multicast stays off, as the device docs ask (it can take a host's shared GPUs down).
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export RAY_DISABLE_IMPORT_WARNING=1
  export RAY_USAGE_STATS_ENABLED=0                 # no network there: don't try to report
  export PREFECT_HOME=$_R/prefect
  export PREFECT_SERVER_ANALYTICS_ENABLED=false    # likewise
  # The first start of Prefect's temporary API server builds its SQLite database: give it time.
  export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
  export MLFLOW_TRACKING_URI=sqlite:///$_R/mlflow.db
  mkdir -p "$PREFECT_HOME"
  [ $ok = 0 ] || return 1

  local check=${DEVICE_ENV_CHECK:-auto}
  if [ "$check" = 1 ] || { [ "$check" = auto ] && { [ $_device_env_fresh = 1 ] || [ ! -f $_R/.device_env_checked ]; }; }; then
    python3 - <<'EOF' || return 1
import importlib, importlib.metadata as md, os, re, sys, time
R = os.environ.get('DEVICE_ENV_ROOT', '/root')
t0 = time.time()
bad = []
for mod, dist, required in [
        ("vllm", "vllm", 1), ("ray", "ray", 1), ("prefect", "prefect", 1), ("mlflow", "mlflow-skinny", 1),
        ("pyarrow", "pyarrow", 1), ("pandas", "pandas", 1), ("pydantic", "pydantic", 1), ("yaml", "pyyaml", 1),
        ("sqlalchemy", "sqlalchemy", 1), ("alembic", "alembic", 1), ("gguf", "gguf", 1),
        ("liger_kernel", "liger-kernel", 0),
        ("peft", "peft", 0), ("torch", "torch", 0), ("transformers", "transformers", 0)]:
    try:
        m = importlib.import_module(mod)
        f = getattr(m, "__file__", "") or ""
        where = max((p for p in sys.path if p and f.startswith(p.rstrip("/") + "/")), key=len, default=f)
        print(f"  {mod:13s} {getattr(m, '__version__', None) or md.version(dist):14s} {where}")
    except Exception as e:
        if required:
            bad.append(mod)
        print(f"  {mod:13s} IMPORT FAILED: {type(e).__name__}: {e}")
# Requirements of the carried packages (both bundles) that the machine does not meet: the image's
# versions were not known when the bundles were made, so this is the place where a clash shows.
try:
    from packaging.requirements import Requirement
    seen, notes, vnotes = set(), [], []
    for d in md.distributions():
        loc = str(getattr(d, "_path", ""))
        name = (d.metadata["Name"] or "").lower()
        if not loc.startswith((R + "/xsite", R + "/vsite")) or name in seen:
            continue
        seen.add(name)
        for r in d.requires or []:
            req = Requirement(r)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            out = notes if loc.startswith(R + "/xsite") else vnotes
            try:
                v = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{name}: needs {req}, not installed")
                continue
            if req.specifier and not req.specifier.contains(v, prereleases=True):
                out.append(f"{name}: needs {req}, has {v}")
    for n in notes:
        print("  note (extras):", n)
    if os.environ.get("DEVICE_ENV_VERBOSE") == "1":
        for n in vnotes:
            print("  note (vLLM bundle):", n)
    elif vnotes:
        # the vLLM bundle leaves optional kernels out on purpose (see shared/tools/device-vllm)
        print(f"  ({len(vnotes)} unmet requirements in the vLLM bundle, e.g. optional kernels; DEVICE_ENV_VERBOSE=1 lists them)")
except Exception as e:
    print("  (requirement check skipped:", e, ")")
print(f"device_env: imports {'FAILED: ' + ' '.join(bad) if bad else 'ok'} ({time.time() - t0:.1f} s)")
sys.exit(1 if bad else 0)
EOF
    touch $_R/.device_env_checked
  fi
  return 0
}

_device_env_main

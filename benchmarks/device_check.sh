#!/usr/bin/env bash
# One bounded check on a CUDA machine (about 8 minutes on an H100 / H200; no network): environment,
# `outlierd bench --suite gpu` (the custom CUDA kernel, torch and ONNX Runtime CUDA where they start,
# device-resident and end-to-end throughput against the 100 M / 50 M records/s targets, the CPU/GPU
# crossover), then the gpu-marked tests, then (time permitting) the suites that take other branches
# when a GPU is present. Results under $OUT, at most 8 files:
#   env.txt  bench.txt  bench-gpu/{results.json,report.html,summary.txt,gpu.png}  tests.txt  extra.txt
#   OUT=/tmp/out bash benchmarks/device_check.sh
# Without a GPU it records "no GPU" and exits 0. Wheels missing on the machine can be carried in
# .whl/ (installed into /tmp/site first).
set -u
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 NUMBA_CACHE_DIR=/tmp/numba-cache
OUT=${OUT:-/tmp/outlierd-device}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
# The package as it installs (core/ as outlierd.core, ...: pyproject's package-dir mapping), without a
# build: .ci/installed_layout.py lays symlinks out under build/installed-layout. PYTHONSAFEPATH keeps
# the checkout's own outlierd/ folder (the CLI alone) from shadowing it, in subprocesses too.
python3 .ci/installed_layout.py true || exit 3
export PYTHONPATH=$PWD/build/installed-layout${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi: no GPU here"; nproc
  python3 - <<'EOF'
import importlib
for m in ("numpy", "numba", "numba_cuda", "torch", "onnxruntime", "sklearn", "matplotlib", "google.protobuf", "grpc"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", e)
from outlierd.core.backends import cuda_available
print("cuda_available:", {b: cuda_available(b) for b in ("cuda", "torch", "onnx")})
try:
    from numba import cuda
    print("numba.cuda:", getattr(cuda, "implementation", "?"), cuda.is_available() and cuda.get_current_device().name)
except Exception as e:
    print("numba.cuda: unavailable:", e)
EOF
} 2>&1 | tee "$OUT/env.txt"
# 1. the benchmark report (the full sizes: 1M-row batches, 16M-row device-resident / end-to-end runs)
timeout 330 python3 -m outlierd bench --suite gpu --out "$OUT/bench-gpu" 2>&1 | tee "$OUT/bench.txt" | tail -30
echo "bench rc=${PIPESTATUS[0]} after $((SECONDS - START)) s" | tee -a "$OUT/bench.txt"
# 2. the gpu-marked tests of the GPU backends (and the no-GPU checks where there is none)
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" --benchmark-disable \
  tests/test_forest_cuda.py tests/test_forest_backends.py tests/test_device.py 2>&1 | tee "$OUT/tests.txt" | tail -15
# 3. time permitting (the whole script stays under ~8 minutes): the other suites with GPU branches
left=$((470 - (SECONDS - START)))
if [ "$left" -gt 40 ]; then
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" --benchmark-disable -x \
    tests/test_knn.py tests/test_autoencoder.py tests/test_explain.py tests/test_iforest.py tests/test_reload.py \
    2>&1 | tee "$OUT/extra.txt" | tail -8
else
  echo "skipped: ${left}s left of the 8-minute plan" | tee "$OUT/extra.txt"
fi
echo "device_check: done in $((SECONDS - START)) s"
exit 0

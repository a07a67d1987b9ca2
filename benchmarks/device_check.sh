#!/usr/bin/env bash
# One bounded check on a CUDA machine: environment, the CUDA-path tests (and the suites whose
# behaviour changes when a GPU is present), then the GPU suite's timings. Results under $OUT.
#   OUT=/tmp/out bash benchmarks/device_check.sh
# Wheels missing on the machine can be carried in .whl/ (installed into /tmp/site first).
set -u
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
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, numba, numpy, onnxruntime, sklearn, google.protobuf as pb; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numba', numba.__version__, 'numpy', numpy.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers(), 'sklearn', sklearn.__version__, 'protobuf', pb.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# the CUDA-marked tests, then suites that take other branches when a GPU is present
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" --benchmark-disable \
  tests/test_forest_backends.py tests/test_knn.py tests/test_autoencoder.py tests/test_explain.py tests/test_device.py \
  tests/test_iforest.py tests/test_reload.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
# benchmarks/ has its own conftest: a separate run
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu benchmarks/test_bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.txt" | tail -15
timeout 90 python3 benchmarks/torch_forest_chunks.py 2>&1 | tee "$OUT/chunks.txt"
timeout 200 python3 benchmarks/gpu_suite.py --device cuda --max-rows 4000000 --budget-s 150 --json "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.txt"

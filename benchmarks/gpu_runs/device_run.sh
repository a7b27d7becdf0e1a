# device-side glue for benchmarks/ort_cuda.py check (run from the repo root on the GPU machine;
# benchmarks/gpu_runs/README.md says what it expects there)
set -u
mkdir -p /tmp/xfer && cp .xfer4/* /tmp/xfer/
[ -f /tmp/ort.tar.xz ] || cat /tmp/xfer/part0 /tmp/xfer/part1 /tmp/xfer/part2 /tmp/xfer/part3 /tmp/xfer/part4 > /tmp/ort.tar.xz
echo "$(cat .gpu/ort.sha)  /tmp/ort.tar.xz" | sha256sum -c || exit 2
if [ ! -d /tmp/site/onnxruntime ]; then  # once per machine
  mkdir -p /tmp/site
  python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site')" || exit 2
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$(find "$NV" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi -L
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
PYTHONUNBUFFERED=1 timeout 300 python3 ${SCRIPT:-benchmarks/ort_cuda.py check .gpu/prep $OUT --repeats 7}
echo "check exit: $?"

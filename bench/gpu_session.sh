#!/usr/bin/env bash
# Everything the open issues need from a GPU, in one device call (a session has 15 minutes of
# device time, start included, so batch): the CUDA tests, the kernel benchmark
# against torch eager, torch.compile and Liger-Kernel, the six-block CNN pair's measured block
# costs for the planner benchmark, and the environment they ran in.
#
#   bash bench/gpu_session.sh "$OUT"          # from the repository root, on the GPU machine
#
# The GPU machine cannot reach the package registries. Liger-Kernel (pure Python) travels as a
# wheel: here, `python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel`, with
# .whl ignored by git (`echo /.whl/ >> .git/info/exclude`) and named in the device call's carry.
# Results land in OUT: copy the kernel table into BENCHMARKS.md with the command that made it;
# copy profile-b*.json into bench/results/ and run bench/planner.py --profile-file on them here.
# A device call brings back at most 8 files from OUT: this writes 7 (environment.txt,
# gpu-tests.txt, profile-b64.json, profile-b256.json, profile.md, kernels.md, and log.txt with
# the profile and kernel runs' output).
set -uo pipefail
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# pipebd itself, offline: its dependencies are in the machine's image.
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{
    nvidia-smi
    python3 -c 'import torch, triton, platform; print("torch", torch.__version__, "triton", triton.__version__,
"python", platform.python_version(), torch.cuda.get_device_name())'
    python3 -c 'import liger_kernel; print("liger-kernel", getattr(liger_kernel, "__version__", "installed"))' ||
        echo "liger-kernel: not installed (its column will be skipped)"
} 2>&1 | tee "$out/environment.txt"
status=0
# Each step has its own time limit (seconds), so that one that hangs leaves time for the rest
# inside one 600 s device call; output is written as it comes, so a cut-off step still returns
# what it printed.
# 130 + 2 x 45 + 320 s leaves about a minute of the call for the installs and imports above.
timeout 130 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_cuda.py 2>&1 | tee "$out/gpu-tests.txt" || status=1
for batch in 64 256; do
    timeout 45 python3 bench/gpu_profile.py --batch-size $batch --out "$out/profile-b$batch.json" \
        --append "$out/profile.md" 2>&1 | tee -a "$out/log.txt" || status=1
done
timeout 320 python3 bench/kernels.py --append "$out/kernels.md" 2>&1 | tee -a "$out/log.txt" || status=1
exit $status

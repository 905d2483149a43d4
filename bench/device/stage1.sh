# Device call 1 of 2 (see README.md here): park the first half of the mlx-cuda wheel and the
# pure-Python / cuDNN-frontend wheels in /tmp, which outlives a call while the machine stays warm.
#   run(command="bash bench/device/stage1.sh", carry=[".gpu/p1", ".gpu/deps"])
set -e
mkdir -p /tmp/mw /tmp/deps
cp .gpu/p1/* /tmp/mw/
cp .gpu/deps/* /tmp/deps/ 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

# Device call 2 of 2, right after stage1.sh: reassemble and install mlx-cuda into /tmp/site,
# point Python and the loader at it, then run the given command with that environment.
#   run(command="bash bench/device/stage2.sh python3 bench/cudnn_attention_check.py --trace",
#       carry=[".gpu/p2"])
# A crash report from MLXFLOW_CUDA_ATTENTION_TRACE (library + offset lines) is symbolised with
# addr2line when the device has it.
set -e
cp .gpu/p2/* /tmp/mw/
( cd /tmp/mw && cat mlxcuda.part.* > "$(cat NAME)" && python3 -m pip install -q --no-index --no-deps \
    --target /tmp/site mlx-*.whl mlx_lm-*.whl "$(cat NAME)" /tmp/deps/*.whl 2>&1 | grep -vi warning | tail -3 )
set +e
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=$(python3 -c 'import glob,nvidia,os;print(":".join(sorted(glob.glob(os.path.join(nvidia.__path__[0],"*","lib")))))')
export MLXFLOW_KERNELS_CACHE=/tmp/mlxflow-kernels
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
"$@" 2>&1 | tee /tmp/stage2.log | grep -vi warning
rc=${PIPESTATUS[0]}
if command -v addr2line >/dev/null; then
  grep -E '^  #[0-9]+ /.*_mlxflow_cuda.* \+0x' /tmp/stage2.log | while read -r n lib off rest; do
    off=${off#+}
    echo "$n $(addr2line -f -C -i -e "$lib" "$off" | tr '\n' ' ')"
  done
fi
for f in /tmp/mlxflow-kernels/*/FAILED; do [ -f "$f" ] && { echo "== $f"; grep -iE "error" "$f" | head -20; }; done
exit $rc

#!/usr/bin/env bash
# Install moetron and its dependencies into the current Python environment.
#
# Order matters: torch is installed FIRST (the CPU wheel on CPU machines), so nothing later can pull a
# multi-GB CUDA torch as a transitive dependency. megatron-core 0.19.2 declares Requires-Python >=3.12, but
# every file parses on 3.11; it is installed with --no-deps --ignore-requires-python after its real runtime
# deps (numpy<2.5, packaging, psutil). See ../shared/DESIGN.md section 5.
#
# Usage: bash launcher/install.sh [--dev] [--gpu]
#   --dev  test/benchmark tools (pytest, hypothesis, deepspeed FLOP profiler, transformers for HF parity)
#   --gpu  transformer-engine (needs CUDA; FP8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's own notices about unusable index locations in a machine's pip configuration are not moetron's to act on;
# every other message (and every error) still reaches the console.
PIP=pip_install
pip_install() {
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
DEV=0; GPU=0
for a in "$@"; do
  case "$a" in
    --dev) DEV=1 ;;
    --gpu) GPU=1 ;;
    *) echo "install.sh: unknown option '$a' (use --dev and/or --gpu)" >&2; exit 2 ;;
  esac
done
TORCH_VERSION=${MOETRON_TORCH_VERSION:-2.13.0}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  $PIP "torch==$TORCH_VERSION"
fi
$PIP "numpy<2.5" packaging psutil pyyaml "triton==3.9.0" "webdataset==1.0.2" "tensorboard==2.21.0" pillow \
     "safetensors==0.8.0" "tokenizers==0.23.3" tqdm
$PIP --no-deps --ignore-requires-python "megatron-core==0.19.2"
$PIP --no-deps "torchao==0.18.0"  # FP8 (fp8.backend=torchao); --no-deps: it must never replace the torch above
if [ "$DEV" = 1 ]; then
  $PIP pytest pytest-timeout hypothesis "transformers==5.23.0" pyarrow
  DS_BUILD_OPS=0 $PIP "deepspeed==0.19.8"
fi
if [ "$GPU" = 1 ]; then
  $PIP "transformer-engine[pytorch]"
fi
$PIP --no-deps --no-build-isolation -e .
$PY -c "import parallel, torch, megatron.core, triton, torchao.float8; print('moetron install ok: torch', torch.__version__)"

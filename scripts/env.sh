# Sourced by scripts/run.sh and scripts/test.sh: make .venv when it is missing and install
# the requirements when they changed since the last install. $1: the requirements file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requirements=$1
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.stepwise-installed
want=$(cat "$requirements" requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first: on a CPU-only machine STEPWISE_TORCH_INDEX can name PyTorch's CPU wheel index,
    # so pip takes the CPU build instead of the CUDA one (gigabytes of CUDA libraries)
    torch_pin=$(grep -E '^torch==' requirements.txt)
    .venv/bin/python -m pip install --quiet "$torch_pin" ${STEPWISE_TORCH_INDEX:+--index-url "$STEPWISE_TORCH_INDEX"}
    .venv/bin/python -m pip install --quiet -r "$requirements"
    echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} GRADIO_ANALYTICS_ENABLED=False

#!/usr/bin/env bash
# The speed comparison on a GPU (docs/speed.md): goodhart on CUDA against PyTorch eager
# on the same GPU, alternating runs, at the GPT-2-small shape and at config S with
# batch 512 x 256 new tokens. Needs an xtask binary built with `--features cuda`
# (XTASK=path, default target/debug/xtask) and python3 with torch; prints one JSON
# object per shape.
set -euo pipefail
cd "$(dirname "$0")/.."
xtask=${XTASK:-target/debug/xtask}
device=${DEVICE:-cuda}
runs=${RUNS:-3}
python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"'
shape() {
  echo "== $*" >&2
  "$xtask" bench policy --device "$device" --vs-torch --runs "$runs" --json "$@"
}
shape --batch 8 --prompt 64 --response 64 --layers 12 --width 768 --heads 12 --vocab 50304
shape --batch 512 --prompt 16 --response 256

#!/usr/bin/env bash
# The GPU check on a single-GPU machine without network access (see docs/gpu-results.md).
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu-check-out
#   bash bench/gpu_check.sh --cpu-dry  # the same code path, tiny model, CPU
# Wheels carried in .whl/ (deepspeed, bitsandbytes, peft, datasets and their missing
# dependencies) are installed into /tmp/site first, without an index and without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/ftlaunch-torch-extensions}"
OUT_DIR="${OUT:-gpu-check-out}"
mkdir -p "$OUT_DIR"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())' \
    | tee "$OUT_DIR/env.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT_DIR/env.txt"
import importlib
for name in ("transformers", "accelerate", "deepspeed", "bitsandbytes", "peft", "datasets"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # the part needing it records the error; the others still run
        print(name, "MISSING:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PYEOF
# 470 s wall at most: the parts stop starting new settings after 420 s
timeout 470 "$PY" bench/gpu_check.py --out "$OUT_DIR" --budget-s 420 "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The GPU check on a single-GPU machine without network access (see docs/gpu-results.md).
#   bash bench/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu-check-out
#   bash bench/gpu_check.sh --cpu-dry  # the same code path, tiny model, CPU
# Wheels carried in .whl/ (deepspeed, bitsandbytes, peft, accelerate, datasets and their missing
# dependencies) are installed into /tmp/site first, one by one, without an index and without
# dependencies: a wheel that does not install is recorded in env.txt and the rows that need it
# record the import error, the others still run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-gpu-check-out}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/env.txt"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"      # where the carried wheels are
SITE="${GPU_CHECK_SITE:-/tmp/site}"      # where they are installed
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    for wheel in "$WHEELS"/*.whl; do
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
                "$wheel" >> "$OUT_DIR/wheels.log" 2>&1; then
            echo "wheel not installed: $wheel (see wheels.log)" | tee -a "$OUT_DIR/env.txt"
        fi
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/ftlaunch-torch-extensions}"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())' \
    | tee -a "$OUT_DIR/env.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT_DIR/env.txt"
import importlib
for name in ("transformers", "accelerate", "deepspeed", "bitsandbytes", "peft", "datasets", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # the part needing it records the error; the others still run
        print(name, "MISSING:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PYEOF
# 560 s wall at most: the parts stop starting new settings after 500 s
timeout 560 "$PY" bench/gpu_check.py --out "$OUT_DIR" --budget-s 500 "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The whole GPU path on one device, ending in one JSON report:
#   (export) -> build-engine fp16 -> verify on TensorRT -> latency with and without CUDA graphs
#   (bench_trt.py) -> inspection-loop throughput (bench_loop.py) -> $OUT/device_check.json
#
#   benchmarks/device_check.sh                          # the tests' tiny random-weights checkpoint (needs torch)
#   benchmarks/device_check.sh runs/weave/model.ckpt    # a checkpoint: exported first (needs torch)
#   benchmarks/device_check.sh export/weave-512x512-fp16.onnx   # an export: no torch needed (e.g. a Jetson)
#
# Environment: PY (default .venv/bin/python), OUT (default benchmarks/results/device_check), PROFILE (a
# build profile TOML), ITERATIONS (default 200). Every step runs even when one before it failed (when it
# can); the report records each step's exit code and the script exits non-zero if any failed.
set -uo pipefail

PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${OUT:-benchmarks/results/device_check}
PROFILE=${PROFILE:-}
ITERATIONS=${ITERATIONS:-200}
SOURCE=${1:-}
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

step() {  # step NAME COMMAND...: run, log its output, record exit code and seconds
    local name=$1; shift
    local started=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    tail -n 20 "$OUT/$name.log"
    printf '{"step": "%s", "exit_code": %d, "seconds": %d}\n' "$name" "$code" "$((SECONDS - started))" >> "$STEPS"
    return $code
}

if [ -z "$SOURCE" ]; then
    SOURCE="$OUT/tiny-run/model.ckpt"
    step tiny-checkpoint "$PY" -c "
import torch
from reconad.model import ModelConfig, build_detector, save_checkpoint
torch.manual_seed(0)
save_checkpoint(build_detector(ModelConfig.tiny()).eval(), '$SOURCE', categories=['weave', 'pill'])
"
fi

case "$SOURCE" in
    *.onnx) ONNX=$SOURCE ;;
    *)
        step to-onnx "$BIN/recon-export" to-onnx "$SOURCE" --out "$OUT/export" --precision both --max-batch 8
        ONNX=$(ls "$OUT"/export/*-fp16.onnx 2>/dev/null | head -n 1)
        ;;
esac

ENGINE=""
if [ -n "${ONNX:-}" ]; then
    # Beside the ONNX, so that verify finds the reference npz of the graph the engine was built from.
    step build-engine "$BIN/recon-export" build-engine "$ONNX" ${PROFILE:+--profile "$PROFILE"} --out "$(dirname "$ONNX")" \
        && ENGINE=$(tail -n 1 "$OUT/build-engine.log")
fi

if [ -n "$ENGINE" ]; then
    step verify "$BIN/recon-export" verify "$ENGINE" --backend trt --json
    step bench-trt "$PY" benchmarks/bench_trt.py --model "$ENGINE" --iterations "$ITERATIONS" --out "$OUT/bench_trt.json"
    step bench-loop "$PY" benchmarks/bench_loop.py --model "$ENGINE" --backend trt \
        && cp benchmarks/results/bench_loop.json "$OUT/bench_loop.json"
fi

"$PY" - "$OUT" "${ENGINE:-}" <<'EOF'
import json, sys
from pathlib import Path

out, engine = Path(sys.argv[1]), sys.argv[2]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
report = {"engine": engine or None, "steps": steps}
verify_log = out / "verify.log"
if verify_log.is_file():
    text = verify_log.read_text()
    try:
        report["verify"] = json.loads(text[text.index("{"):])
    except ValueError:
        report["verify"] = {"error": text.strip().splitlines()[-1:]}
for name in ("bench_trt", "bench_loop"):
    path = out / f"{name}.json"
    if path.is_file():
        report[name] = json.loads(path.read_text())
if engine and Path(engine).with_suffix(".json").is_file():
    manifest = json.loads(Path(engine).with_suffix(".json").read_text())
    report["engine_manifest"] = {key: manifest[key] for key in ("precision", "engine", "input_tensor")}
report["passed"] = bool(steps) and all(step["exit_code"] == 0 for step in steps) and bool(engine)
(out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out / 'device_check.json'}: {'PASS' if report['passed'] else 'FAIL'}")
sys.exit(0 if report["passed"] else 1)
EOF

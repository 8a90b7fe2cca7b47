#!/usr/bin/env bash
# The demo pipeline, one stage after another: synthetic sample data -> fit (lite0-256, offline-pretrained
# backbone) -> evaluate (prints the metrics and operating points) -> export fp32/fp16/int8 -> verify -> calibrate per
# category -> inspect the test folders -> the camera loop over a video -> the per-category operating points.
# Run by `make demo`; DEMO_DIR and PY come from the Makefile.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-demo}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
DEMO_EPOCHS=${DEMO_EPOCHS:-3}
DEMO_LR=${DEMO_LR:-1e-3}
DEMO_BATCH_SIZE=${DEMO_BATCH_SIZE:-8}
SECONDS=0

stage() { echo; echo "== [$(printf '%4d' "$SECONDS") s] $*"; }

stage "sample-data: synthetic MVTec-layout data set -> $DEMO_DIR/data"
"$BIN/recon-train" sample-data "$DEMO_DIR/data" --seed 0 --overwrite

stage "fit: one lite0-256 model for all categories -> $DEMO_DIR/run"
rm -rf "$DEMO_DIR/run"
"$BIN/recon-train" fit "$DEMO_DIR/data" --preset lite0-256 --out "$DEMO_DIR/run" \
    --epochs "$DEMO_EPOCHS" --lr "$DEMO_LR" --batch-size "$DEMO_BATCH_SIZE" --val-every-epochs 0

stage "evaluate: metrics per category and mean -> $DEMO_DIR/report"
"$BIN/recon-train" evaluate "$DEMO_DIR/run/model.ckpt" "$DEMO_DIR/data" --out "$DEMO_DIR/report"

stage "to-onnx: fused fp32 and fp16 graphs, checked against PyTorch -> $DEMO_DIR/onnx"
rm -rf "$DEMO_DIR/onnx"
REFERENCE_IMAGES=$(ls -d "$DEMO_DIR"/data/*/test | head -n 1)
"$BIN/recon-export" to-onnx "$DEMO_DIR/run/model.ckpt" --out "$DEMO_DIR/onnx" --precision both \
    --reference-images "$REFERENCE_IMAGES"
ONNX_FP32=$(ls "$DEMO_DIR"/onnx/*-fp32.onnx)
ONNX_FP16=$(ls "$DEMO_DIR"/onnx/*-fp16.onnx)

stage "to-onnx int8: a QDQ graph calibrated on the good training images, checked against PyTorch and on the test AUROC"
CALIBRATION=()
for good in "$DEMO_DIR"/data/*/train/good; do CALIBRATION+=(--calibration-images "$good"); done
"$BIN/recon-export" to-onnx "$DEMO_DIR/run/model.ckpt" --out "$DEMO_DIR/onnx" --precision int8 \
    "${CALIBRATION[@]}" --evaluation-data "$DEMO_DIR/data" --reference-images "$REFERENCE_IMAGES"
ONNX_INT8=$(ls "$DEMO_DIR"/onnx/*-int8.onnx)

stage "verify: the three graphs on ONNX Runtime against the PyTorch reference (torch-free)"
"$BIN/recon-export" verify "$ONNX_FP32" --backend ort-cpu
"$BIN/recon-export" verify "$ONNX_FP16" --backend ort-cpu
"$BIN/recon-export" verify "$ONNX_INT8" --backend ort-cpu

# Held-out good images: scores of the training images themselves are biased low. Given the data root,
# calibrate sets each category's thresholds on its test/good (and a global one on all of them), and
# reports each category's operating point on its test split.
stage "calibrate: per-category thresholds of the fp16 graph from held-out defect-free images (<category>/test/good)"
"$BIN/recon-inspect" calibrate "$ONNX_FP16" "$DEMO_DIR/data" | tee "$DEMO_DIR/calibration.txt"

stage "inspect: the sample test images with the fp16 graph -> $DEMO_DIR/inspect"
rm -rf "$DEMO_DIR/inspect"
for test_dir in "$DEMO_DIR"/data/*/test; do
    category=$(basename "$(dirname "$test_dir")")
    "$BIN/recon-inspect" run "$test_dir" --model "$ONNX_FP16" --out "$DEMO_DIR/inspect/$category"
done

# Lossless (FFV1): the loop sees the pixels the thresholds were calibrated on (see scripts/make_video.py).
stage "camera loop: a video of the sample test images through the pipelined loop -> $DEMO_DIR/video"
"$PY" scripts/make_video.py "$DEMO_DIR"/data/*/test --out "$DEMO_DIR/line.avi" --fps 5
rm -rf "$DEMO_DIR/video"
"$BIN/recon-inspect" run "$DEMO_DIR/line.avi" --model "$ONNX_FP16" --out "$DEMO_DIR/video" --stats-interval-s 5

stage "done: report in $DEMO_DIR/report/report.md, verdicts in $DEMO_DIR/inspect and $DEMO_DIR/video"
echo "operating points of the fp16 graph, each category at its own threshold (the model names the category):"
grep "operating point on its test split" "$DEMO_DIR/calibration.txt" | sed 's/^ */  /'

#!/usr/bin/env bash
# The whole job, offline, on the demo data: install, generate data, train and test (metrics are
# printed), export to OpenVINO, and predict one image with OpenVINO.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
CATEGORY="${CATEGORY:-brick}"

python -m anomalib_cflow_plus.data --root datasets/demo
anomalib train --config configs/demo.yaml --data.category "$CATEGORY"
CKPT="results/CflowPlus/MVTecAD/$CATEGORY/latest/weights/lightning/model.ckpt"
anomalib export --model CflowPlus --export_type openvino --ckpt_path "$CKPT" \
    --default_root_dir "results/CflowPlus/MVTecAD/$CATEGORY/latest"
python scripts/predict_openvino.py \
    --model "results/CflowPlus/MVTecAD/$CATEGORY/latest/weights/openvino/model.xml" \
    --image "datasets/demo/$CATEGORY/test/scratch/000.png" \
    --output "results/demo_prediction.png"

#!/usr/bin/env bash
# GPU check, a few minutes on a lent accelerator: bf16 training throughput of a config, then
# a bundle written on CPU restored onto the accelerator and sampled.
#
#   bench/gpu_check.sh [CONFIG] [BUNDLE] [--config.x=y ...]
#
# CONFIG  a named config (default retro_172m): $STEPS (default 10) timed training steps on
#         random tokens in bfloat16 by bench/train_throughput.py, whose JSON line is printed
#         as it is (train_tokens_per_s, FLOPs; MFU where the bench reports it). The extra
#         --config.* overrides go to this bench (e.g. --config.data.batch_size=32).
# BUNDLE  a run bundle (python -m training.export: a folder, gs://..., hf://org/name or
#         org/name; default bundles/tiny_retro, written on CPU by
#         `python train.py --config tiny_retro --workdir runs/tiny_retro &&
#          python -m training.export --workdir runs/tiny_retro --out bundles/tiny_retro`):
#         greedy generation of 80 tokens with retrieval and citations.
# $PYTHON picks the interpreter (default python). CI runs it on CPU with tiny_retro
# (tests/test_notebook.py::test_gpu_check_script_runs_on_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-retro_172m}"
bundle="${2:-bundles/tiny_retro}"
shift $(($# < 2 ? $# : 2))
python="${PYTHON:-python}"

echo "== train ${config}: bfloat16, ${STEPS:-10} timed steps"
"${python}" bench/train_throughput.py --config "${config}" --steps "${STEPS:-10}" \
  --config.model.dtype=bfloat16 "$@"
echo "== restore ${bundle} and generate"
"${python}" generate.py --workdir "${bundle}" --max-tokens 80 --temperature 0 --keep-eos \
  --prompt "To be, or not to be, that is the question:"

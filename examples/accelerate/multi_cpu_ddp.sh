#!/usr/bin/env bash
# 2 CPU processes, DDP over gloo (what tests/trainers/test_trainer_distributed.py checks).
# `accelerate launch --cpu` starts a single process; use torchrun for several CPU processes.
set -euo pipefail
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m alignfast.cli train sft \
  --config examples/sft.yaml --model "${MODEL:?set MODEL}" --dataset "${DATASET:?set DATASET}" cpu=true "$@"

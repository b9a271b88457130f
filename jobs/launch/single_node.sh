#!/usr/bin/env bash
# One machine, N GPUs, through the DeepSpeed launcher. Rerun the same command after a crash or
# preemption: it resumes from the latest published checkpoint.
#   jobs/launch/single_node.sh 8 jobs/resnet50w2.yaml [key=value ...]
set -euo pipefail
ngpus=${1:?usage: single_node.sh NUM_GPUS CONFIG [key=value ...]}
config=${2:?usage: single_node.sh NUM_GPUS CONFIG [key=value ...]}
shift 2
exec deepspeed --num_gpus "$ngpus" --no_local_rank --module swav.cli pretrain "$config" "$@"

#!/usr/bin/env bash
# Many machines through the DeepSpeed launcher and a hostfile ("host slots=8" per line), started on
# the first host; every host needs the same checkout and virtualenv, and passwordless ssh between hosts.
#   HOSTFILE=hosts.txt jobs/launch/multinode.sh jobs/resnet50.yaml [key=value ...]
# Storage credentials travel as environment (AWS_* or SWAV_STORAGE_OPTIONS), listed in .deepspeed_env.
set -euo pipefail
config=${1:?usage: multinode.sh CONFIG [key=value ...]}
shift
hostfile=${HOSTFILE:-hostfile}
[ -f "$hostfile" ] || { echo "no hostfile at $hostfile (set HOSTFILE)" >&2; exit 2; }
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module swav.cli pretrain "$config" "$@"

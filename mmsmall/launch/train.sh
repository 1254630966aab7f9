#!/usr/bin/env bash
# Train with DeepSpeed: one process per local GPU, N CPU processes (gloo) without a GPU, or
# across nodes with a hostfile.
#
#   launch/train.sh CONFIG [key=value ...]
#   launch/train.sh configs/train/tiny-pretrain.yaml data.train='[{path: shards/}]' train.steps=50
#
# Environment:
#   NPROC=N        processes on this node (default: every visible GPU; 1 on CPU)
#   HOSTFILE=path  multi-node: DeepSpeed hostfile ("node1 slots=8" per line, passwordless ssh),
#                  with MASTER_ADDR=<first node's address> (and optionally MASTER_PORT)
#   NODE_RANK=k    with HOSTFILE, no ssh: start the same command on each node, k = 0..N-1
#   PYTHON=path    interpreter (default: the repo's .venv/bin/python, else python3)
#   TORCH_EXTENSIONS_DIR  cache for DeepSpeed's compiled ops (default: .cache/torch_extensions)
#
# Two nodes with 8 GPUs each, started once on the first node:
#   printf 'gpu-node-1 slots=8\ngpu-node-2 slots=8\n' > hostfile
#   HOSTFILE=hostfile MASTER_ADDR=gpu-node-1 launch/train.sh configs/train/caption-pretrain.yaml
#
# Under another launcher (`deepspeed --no_python launch/train.sh CONFIG ...`, torchrun, SLURM
# with RANK set) it runs the trainer directly in this process.
set -euo pipefail

# This file ships inside the package (mmsmall/launch/train.sh; in a checkout also reached through the
# launch/ link): ROOT is the folder holding the mmsmall package, a source checkout or site-packages.
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.venv" ]; then cache="$ROOT/.cache"; else cache="${XDG_CACHE_HOME:-$HOME/.cache}/mmsmall"; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [ $# -lt 1 ]; then
  echo "usage: launch/train.sh CONFIG [key=value ...]   (e.g. configs/train/tiny-pretrain.yaml)" >&2
  exit 2
fi

# Already one rank of a launched job: run the trainer (it drops a launcher's --local_rank itself).
if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; then
  exec "$PY" -m mmsmall.train "$@"
fi

# Check the config, data, models, out_dir (free, not a file) and init_from in one short Python
# process before the DeepSpeed launcher starts any rank: a mistake fails here in one line (exit 2).
# The first node checks; the others start their ranks, which stop with the first node's.
if [ "${NODE_RANK:-0}" = "0" ]; then "$PY" -m mmsmall.train.preflight "$@" || exit $?; fi

launcher=("$PY" -m deepspeed.launcher.runner)
if [ -n "${HOSTFILE:-}" ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the first node of $HOSTFILE}"
  launcher+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
  # Without ssh: run this same command on every node with NODE_RANK=0..N-1 (DeepSpeed's --no_ssh).
  if [ -n "${NODE_RANK:-}" ]; then launcher+=(--no_ssh --node_rank "$NODE_RANK"); fi
else
  ngpu=0
  if [ "${DS_ACCELERATOR:-}" != "cpu" ]; then
    ngpu="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  fi
  if [ "$ngpu" -gt 0 ]; then
    nproc="${NPROC:-$ngpu}"
  else
    export DS_ACCELERATOR=cpu
    nproc="${NPROC:-1}"
    export LOCAL_SIZE="$nproc"  # DeepSpeed's CPU accelerator counts "devices" from this
    # threads per process: share the cores instead of oversubscribing them
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
  fi
  port="${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  launcher+=(--num_gpus "$nproc" --master_port "$port")
fi
# DeepSpeed's launcher logs every command and environment variable at INFO: shown with mmsmall -v
[ "${MMSMALL_VERBOSE:-0}" = "1" ] || launcher+=(--log_level warning)
exec "${launcher[@]}" --module --no_local_rank mmsmall.train "$@"

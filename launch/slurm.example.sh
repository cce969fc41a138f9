#!/usr/bin/env bash
# SLURM example: N nodes x 8 GPUs, the paper recipe. Submit with
#   sbatch --nodes=2 launch/slurm.example.sh data.train_shards=/data/mmfr-shards/train
# Every rank resumes from the newest complete checkpoint (checkpoint.resume=auto),
# so the same script continues a preempted or timed-out job (--requeue).
#SBATCH --job-name=fakereasoning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: sbatch [--nodes=N] launch/slurm.example.sh [key=value ...]

Trains the paper recipe (launch/recipes/fakereasoning-13b.yaml) on the SLURM
allocation: one deepspeed launch over a hostfile built from SLURM_JOB_NODELIST,
8 GPUs per node, output_dir=runs/fakereasoning-13b, resuming from the newest
complete checkpoint (checkpoint.resume=auto), so a requeued job continues.
Every argument is a dotted override of the recipe, e.g.
  data.train_shards=/data/mmfr-shards/train model.llm.path=/models/MoF_Models
Run it inside a SLURM job (sbatch or salloc); see docs/operations.md.
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "error: SLURM_JOB_ID / SLURM_JOB_NODELIST are not set: submit with sbatch (see --help)" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs

# A hostfile for the deepspeed launcher from the SLURM allocation.
HOSTFILE="logs/hostfile-${SLURM_JOB_ID}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ slots=8/' > "$HOSTFILE"
MASTER_ADDR=$(head -n1 "$HOSTFILE" | cut -d' ' -f1)

# Variables the launcher does not forward to other nodes go in .deepspeed_env
# (KEY=VALUE per line, no blank lines).
{
  [ -n "${WANDB_API_KEY:-}" ] && echo "WANDB_API_KEY=${WANDB_API_KEY}"
  echo "WANDB_MODE=${WANDB_MODE:-online}"
  echo "HF_HUB_OFFLINE=1"
  echo "OMP_NUM_THREADS=8"
} > .deepspeed_env

.venv/bin/deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port 29500 \
  launch/train.py --config launch/recipes/fakereasoning-13b.yaml \
  output_dir="runs/fakereasoning-13b" checkpoint.resume=auto "$@"

#!/usr/bin/env bash
# SLURM example: N nodes x 8 GPUs, the paper recipe. Submit with
#   sbatch --nodes=2 launch/slurm.example.sh data.train_shards=/data/mmfr-shards/train
# Every rank resumes from the newest complete checkpoint (checkpoint.resume=auto),
# so the same script continues a preempted or timed-out job (--requeue).
# 120 s before the time limit SLURM sends SIGUSR1 to this batch shell (B:); the
# trap touches OUT/STOP, every rank finishes its step, saves a complete
# checkpoint and exits 75 (pipeline/training/preemption.py), and the job requeues
# itself. Without the warning, SLURM's SIGTERM reaches the ranks directly and
# they save within DeepSpeed's 30 s.
#SBATCH --job-name=fakereasoning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: sbatch [--nodes=N] launch/slurm.example.sh [key=value ...]

Trains the paper recipe (launch/recipes/fakereasoning-13b.yaml) on the SLURM
allocation: one deepspeed launch over a hostfile built from SLURM_JOB_NODELIST,
8 GPUs per node, output_dir=runs/fakereasoning-13b, resuming from the newest
complete checkpoint (checkpoint.resume=auto), so a requeued job continues.
SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@120) stops the ranks with a
checkpoint (OUT/STOP) and requeues the job (scontrol requeue) once they exit 75.
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
# (KEY=VALUE per line, no blank lines). Never a secret: DeepSpeed's runner logs
# the pdsh command line, an `export NAME=VALUE` per line, into this job's log,
# and every node shows it in `ps`. W&B reads its key from ~/.netrc (`wandb
# login` writes it, mode 0600) on the node of rank 0. The file is readable by
# its owner only and removed when the job script ends.
trap 'rm -f .deepspeed_env' EXIT
(umask 077 && {
  echo "WANDB_MODE=${WANDB_MODE:-online}"
  echo "HF_HUB_OFFLINE=1"
  echo "OMP_NUM_THREADS=8"
} > .deepspeed_env)
if [ -n "${WANDB_API_KEY:-}" ]; then
  echo "note: WANDB_API_KEY is not forwarded to the nodes (it would be logged); rank 0 uses ~/.netrc (wandb login)" >&2
fi

OUT="runs/fakereasoning-13b"
# Set before OUT exists, so a warning that comes during start-up is not lost.
trap 'echo "SIGUSR1: asking the ranks to stop with a checkpoint ($OUT/STOP)"; touch "$OUT/STOP"' USR1
mkdir -p "$OUT"
# The launcher runs in the background so that this shell can take SIGUSR1 at once.
.venv/bin/deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port 29500 \
  launch/train.py --config launch/recipes/fakereasoning-13b.yaml \
  output_dir="$OUT" checkpoint.resume=auto "$@" &
TRAIN_PID=$!
set +e
while true; do
  wait "$TRAIN_PID"; RC=$?
  # wait returns early (status > 128) when the trap ran; the job is still going.
  kill -0 "$TRAIN_PID" 2>/dev/null || break
done
set -e
# 75: stopped with a complete checkpoint (OUT/PREEMPTED says which); continue later.
if [ "$RC" -eq 75 ] || [ -f "$OUT/PREEMPTED" ]; then
  echo "preempted at $(cat "$OUT/PREEMPTED" 2>/dev/null | tr -d '\n'); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$RC"

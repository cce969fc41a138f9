#!/usr/bin/env bash
# Check a multi-node set-up before spending GPU hours on it:
#
#   bash launch/multinode_selftest.sh --hostfile HOSTFILE [options] [-- key=value ...]
#
# Two launches through `deepspeed --hostfile` with the default pdsh launcher,
# from a work folder of its own (default runs/multinode-selftest/, which every
# node must see at the same path, like the checkout, the .venv and the shards):
#
#   1. a probe: every rank joins the process group (the rendezvous address is
#      the hostfile's first host, passed as --master_addr) and reports its
#      rank, node rank, host and the variables of the generated .deepspeed_env;
#      the probe checks that every hostfile host ran `slots` ranks with the node
#      rank of its line, that every rank used the first host as MASTER_ADDR,
#      and that every .deepspeed_env variable (WANDB_*, HF_*, ...) reached every
#      rank with the same value, while a variable exported only in this shell
#      did not (so the file, not luck, carried them). Secrets (names with KEY,
#      TOKEN, SECRET or PASSWORD) are never put in the file nor printed: W&B
#      reads ~/.netrc on each node. The file (mode 0600) is removed at the end.
#   2. the tiny recipe for a few optimizer steps under ZeRO-3 on all ranks,
#      checked for a complete final checkpoint and log lines of every node.
#
# Exit status 0 and "multinode selftest: PASS" when all checks pass; 1 and the
# failed checks otherwise; the logs stay in the work folder (probe.log,
# train.log). Options (--help prints this header):
#
#   --hostfile FILE     DeepSpeed hostfile ("host slots=N" per line), 2+ hosts
#   --workdir DIR       work folder (default: <checkout>/runs/multinode-selftest)
#   --shards DIR        training shard set to use (default: a synthetic one is
#                       generated and sharded into the work folder)
#   --recipe FILE       training recipe (default: launch/recipes/tiny-cpu.yaml)
#   --steps N           optimizer steps of the training check (default 2)
#   --cpu               CPU-only nodes: DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1
#   --ssh-port PORT     sshd port on the nodes (deepspeed --ssh_port)
#   --no-ssh-check      skip DeepSpeed's plain `ssh HOST hostname` pre-check
#                       (needed when ssh only works with PDSH_SSH_ARGS_APPEND)
#   --master-addr A     rendezvous address (default: the hostfile's first host)
#   --master-port P     rendezvous port (default: random in 29500-29999)
#   --probe-only        stop after the probe
#   -- key=value ...    extra overrides for the training recipe
#
# ssh options for pdsh (an identity file, a known_hosts policy) go in
# PDSH_SSH_ARGS_APPEND, which pdsh appends to every ssh command line.
# DEEPSPEED_LAUNCHER names another `deepspeed` launcher (default: the one next
# to the interpreter, else the one on PATH).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"   # sets repo, py, PYTHONPATH
ds="${DEEPSPEED_LAUNCHER:-$(dirname "$py")/deepspeed}"
[[ -x "$ds" ]] || ds="$(command -v deepspeed || true)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "multinode selftest: error: $*" >&2; exit 2; }

hostfile="" workdir="$repo/runs/multinode-selftest" shards="" recipe="$repo/launch/recipes/tiny-cpu.yaml"
steps=2 cpu=0 ssh_port="" no_ssh_check=0 master_addr="" master_port=$((29500 + RANDOM % 500)) probe_only=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) hostfile="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --shards) shards="$2"; shift 2 ;;
    --recipe) recipe="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --ssh-port) ssh_port="$2"; shift 2 ;;
    --no-ssh-check) no_ssh_check=1; shift ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    --probe-only) probe_only=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$hostfile" ]] || die "--hostfile is required (see --help)"
[[ -f "$hostfile" ]] || die "hostfile $hostfile does not exist"
[[ -n "$ds" ]] || die "no deepspeed launcher next to $py or on PATH"
command -v pdsh >/dev/null || die "pdsh is not installed (Debian/Ubuntu: apt-get install pdsh); the default DeepSpeed multi-node launcher needs it"
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer, got '$steps'"
hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"
recipe="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"

# Hosts in hostfile order, the way DeepSpeed parses them (comments and blank lines ignored).
mapfile -t hosts < <(sed -e 's/#.*//' "$hostfile" | awk 'NF && $2 ~ /^slots=[0-9]+$/ {print $1}')
[[ ${#hosts[@]} -ge 2 ]] || die "$hostfile lists ${#hosts[@]} host(s); a multi-node check needs 2 or more"
master_addr="${master_addr:-${hosts[0]}}"

mkdir -p "$workdir"
workdir="$(cd "$workdir" && pwd)"
if [[ -f "$HOME/.deepspeed_env" ]]; then
  echo "multinode selftest: note: DeepSpeed also reads $HOME/.deepspeed_env; the work folder's file wins per variable" >&2
fi

# ---------------------------------------------------------------- .deepspeed_env
# DeepSpeed forwards only PYTHON*, NCCL*, UCX*, MV2*, MLFLOW* to the nodes it
# reaches by ssh; everything else the ranks need goes in this file. DeepSpeed
# splits each line on the first "=" (a blank line aborts the launch) and wraps
# values in double quotes inside a remote shell command, so values holding
# quotes, $, backquotes, backslashes or newlines cannot be carried: refuse them.
# Secrets never go in it: DeepSpeed's runner logs the pdsh command line with an
# `export NAME=VALUE` per line, and that command line is in `ps` on every node.
# Variables whose name holds KEY, TOKEN, SECRET or PASSWORD (WANDB_API_KEY,
# HF_TOKEN, ...) are left out and named (never their values); W&B reads
# ~/.netrc (`wandb login`) and huggingface_hub its token file on each node.
# The file is made readable by its owner only and removed when this script ends.
if [[ $cpu == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fi
export WANDB_MODE="${WANDB_MODE:-offline}"    # a selftest run should not land in your W&B project
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # the tiny recipe needs nothing from the Hub
export TOKENIZERS_PARALLELISM=false
envfile="$workdir/.deepspeed_env"
trap 'rm -f "$envfile" "$envfile.tmp"' EXIT
(umask 077 && : > "$envfile.tmp")
# A name part ending in KEY, TOKEN, SECRET or PASSWORD (WANDB_API_KEY, HF_TOKEN,
# AWS_SECRET_ACCESS_KEY; not TOKENIZERS_PARALLELISM). The probe uses the same pattern.
secret_name='(^|_)[A-Z0-9]*(KEY|TOKEN|SECRET|PASSWORD)S?(_|$)'
secrets=()
while IFS= read -r name; do
  if [[ "${name^^}" =~ $secret_name ]]; then
    secrets+=("$name")
    continue
  fi
  value="${!name}"
  if [[ "$value" == *[\"\$\`\\]* || "$value" == *$'\n'* ]]; then
    die "cannot forward $name through .deepspeed_env: its value holds a quote, \$, backquote, backslash or newline"
  fi
  printf '%s=%s\n' "$name" "$value" >> "$envfile.tmp"
done < <(compgen -e | grep -E '^(WANDB_|HF_|HUGGING_FACE_|TRANSFORMERS_|DS_ACCELERATOR$|OMP_NUM_THREADS$|MKL_NUM_THREADS$|TOKENIZERS_PARALLELISM$|GLOO_SOCKET_IFNAME$|TORCH_)' | sort)
mv "$envfile.tmp" "$envfile"
if [[ ${#secrets[@]} -gt 0 ]]; then
  echo "multinode selftest: not forwarding ${secrets[*]} (secrets stay out of .deepspeed_env, logs and command lines; W&B reads ~/.netrc, huggingface_hub its token file)" >&2
fi

# Exported here only: the probe checks that no rank sees it, which shows that the
# remote ranks' environment is the .deepspeed_env and not this shell's.
export MULTINODE_SELFTEST_CALLER_ONLY=1

launcher=("$ds" --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
[[ -n "$ssh_port" ]] && launcher+=(--ssh_port "$ssh_port")
[[ $no_ssh_check == 1 ]] && launcher+=(--no_ssh_check)

# ---------------------------------------------------------------- 1. probe
cat > "$workdir/probe.py" <<'EOF'
"""One line per rank: who and where it is, after a real rendezvous."""
import json, os, re, socket, sys
import torch.distributed as td
from deepspeed.accelerator import get_accelerator

accel = get_accelerator()
if accel.device_name() != "cpu":
    accel.set_device(int(os.environ["LOCAL_RANK"]))
td.init_process_group(backend=accel.communication_backend_name())
names = [line.split("=", 1)[0] for line in open(sys.argv[-1]).read().splitlines()]  # after --local_rank
me = {"rank": td.get_rank(), "world_size": td.get_world_size(), "local_rank": int(os.environ["LOCAL_RANK"]),
      "node_rank": int(os.environ["CROSS_RANK"]), "nnodes": int(os.environ["CROSS_SIZE"]),
      "hostname": socket.gethostname(), "ssh_server": (os.environ.get("SSH_CONNECTION") or " - - ").split()[2],
      "master_addr": os.environ["MASTER_ADDR"], "master_port": os.environ["MASTER_PORT"],
      # Values of secret-looking names are never printed (none should be in the file).
      "env": {n: "***" if re.search(r"(^|_)[A-Z0-9]*(KEY|TOKEN|SECRET|PASSWORD)S?(_|$)", n.upper()) else os.environ.get(n) for n in names},
      "caller_only": os.environ.get("MULTINODE_SELFTEST_CALLER_ONLY")}
everyone = [None] * td.get_world_size()
td.all_gather_object(everyone, me)  # proves every rank reached the store and the backend
print("MULTINODE_PROBE " + json.dumps(me, sort_keys=True), flush=True)
td.barrier()
td.destroy_process_group()
EOF

echo "multinode selftest: probe on ${hosts[*]} (master ${master_addr}:${master_port}), log $workdir/probe.log"
set +e
(cd "$workdir" && "${launcher[@]}" "$workdir/probe.py" "$envfile") > "$workdir/probe.log" 2>&1
probe_rc=$?
set -e

"$py" - "$workdir/probe.log" "$hostfile" "$envfile" "$master_addr" "$probe_rc" > "$workdir/probe_report.json" <<'EOF' || { cat "$workdir/probe_report.json" >&2; tail -n 40 "$workdir/probe.log" >&2; echo "multinode selftest: FAIL (probe)"; exit 1; }
import json, re, sys

log, hostfile, envfile, master, rc = sys.argv[1:]
slots = {}
for line in open(hostfile):
    m = re.match(r"^\s*(\S+)\s+slots=(\d+)", line.split("#", 1)[0])
    if m:
        slots[m.group(1)] = int(m.group(2))
hosts = list(slots)
env = dict(l.split("=", 1) for l in open(envfile).read().splitlines())
env = {k: "***" if re.search(r"(^|_)[A-Z0-9]*(KEY|TOKEN|SECRET|PASSWORD)S?(_|$)", k.upper()) else v for k, v in env.items()}
records = []
for line in open(log, errors="replace"):
    # pdsh prefixes every line of a remote command with "<host>: ".
    m = re.match(r"^(\S+): MULTINODE_PROBE (\{.*\})\s*$", line)
    if m:
        records.append((m.group(1), json.loads(m.group(2))))
fail = []
if rc != "0":
    fail.append(f"the probe launch exited with status {rc}")
world = sum(slots.values())
if sorted(r["rank"] for _, r in records) != list(range(world)):
    fail.append(f"expected ranks 0..{world - 1} to report, got {sorted(r['rank'] for _, r in records)}")
for host, r in records:
    where = f"rank {r['rank']} (reported through {host})"
    if host not in slots:
        fail.append(f"{where}: {host} is not a hostfile host")
    elif r["node_rank"] != hosts.index(host):
        fail.append(f"{where}: node rank {r['node_rank']}, but {host} is line {hosts.index(host)} of the hostfile")
    if r["world_size"] != world or r["nnodes"] != len(hosts):
        fail.append(f"{where}: world {r['world_size']} over {r['nnodes']} nodes, expected {world} over {len(hosts)}")
    if r["master_addr"] != master:
        fail.append(f"{where}: MASTER_ADDR={r['master_addr']}, expected the first host {master}")
    wrong = {k: r["env"].get(k) for k, v in env.items() if r["env"].get(k) != v}
    if wrong:
        fail.append(f"{where}: .deepspeed_env variables missing or different: {wrong}")
    if r["caller_only"] is not None:
        fail.append(f"{where}: sees a variable exported only in the launching shell; the env check proves nothing")
for host, n in slots.items():
    got = sum(1 for h, _ in records if h == host)
    if got != n:
        fail.append(f"{host}: {got} rank(s) reported, hostfile says slots={n}")
report = {"ok": not fail, "failures": fail, "hosts": hosts, "master_addr": master,
          "forwarded": sorted(env), "ranks": [dict(r, pdsh_host=h) for h, r in sorted(records, key=lambda x: x[1]["rank"])]}
print(json.dumps(report, indent=1))
sys.exit(1 if fail else 0)
EOF
echo "multinode selftest: probe ok: ${#hosts[@]} nodes, node ranks in hostfile order, MASTER_ADDR=${master_addr}, .deepspeed_env reached every rank"
[[ $probe_only == 1 ]] && { echo "multinode selftest: PASS (probe only)"; exit 0; }

# ---------------------------------------------------------------- 2. tiny training
if [[ -z "$shards" ]]; then
  shards="$workdir/shards"
  if [[ ! -f "$shards/train/sizes.json" ]]; then
    echo "multinode selftest: writing a synthetic MMFR and its shards under $workdir"
    "$py" -m sharding.synthetic --out "$workdir/mmfr" --train-images 64 --eval-images-per-generator 1 --seed 0 --quiet --overwrite
    "$py" -m sharding.shard_mmfr "$workdir/mmfr" "$shards" --max-samples-per-shard 16 --workers 1 --no-progress
  fi
  shards_train="$shards/train"
else
  shards_train="$shards"
  [[ -d "$shards/train" ]] && shards_train="$shards/train"
fi
out="$workdir/train"
rm -rf "$out"
echo "multinode selftest: $steps training step(s) of $(basename "$recipe") on all ranks, log $workdir/train.log"
set +e
(cd "$workdir" && "${launcher[@]}" "$repo/launch/train.py" --config "$recipe" "data.train_shards=$shards_train" \
  "output_dir=$out" "loop.max_steps=$steps" "checkpoint.every_steps=$steps" checkpoint.export=false \
  ${overrides[@]+"${overrides[@]}"}) > "$workdir/train.log" 2>&1
train_rc=$?
set -e

"$py" - "$workdir/train.log" "$out" "$workdir/probe_report.json" "$steps" "$train_rc" <<'EOF' || { tail -n 60 "$workdir/train.log" >&2; echo "multinode selftest: FAIL (training)"; exit 1; }
import json, os, re, sys

log, out, probe, steps, rc = sys.argv[1:]
hosts = json.load(open(probe))["hosts"]
world = len(json.load(open(probe))["ranks"])
text = open(log, errors="replace").read()
fail = []
if rc != "0":
    fail.append(f"training exited with status {rc}")
for i, h in enumerate(hosts):
    # DeepSpeed's per-node launcher logs its node rank; pdsh prefixes the host.
    if not re.search(rf"^{re.escape(h)}: .*node_rank={i}\b", text, re.M):
        fail.append(f"no launcher line 'node_rank={i}' from {h} in {log}")
summary = os.path.join(out, "train_summary.json")
if not os.path.isfile(summary):
    fail.append(f"no {summary}")
else:
    s = json.load(open(summary))
    if s["global_step"] != int(steps):
        fail.append(f"trained to step {s['global_step']}, expected {steps}")
    tag = s.get("final_checkpoint")
    if not tag or not os.path.isfile(os.path.join(s["checkpoint_dir"], tag, "COMPLETE")):
        fail.append(f"final checkpoint {tag} is not complete")
    info = json.load(open(os.path.join(out, "run_info.json")))
    if info["world_size"] != world:
        fail.append(f"training world size {info['world_size']}, probe saw {world}")
for f in fail:
    print("  - " + f, file=sys.stderr)
sys.exit(1 if fail else 0)
EOF
echo "multinode selftest: PASS (${#hosts[@]} nodes; checkpoint in $out/checkpoints)"

#!/usr/bin/env bash
# Multi-node `prism train`: every node runs this same command; the node's role comes from its index.
#   MLP_WORKER_0_HOST=10.0.0.1 MLP_WORKER_0_PRIMARY_HOST=10.0.0.1 MLP_WORKER_NUM=2 \
#   MLP_WORKER_RACK_RANK_INDEX=0|1 MLP_WORKER_GPU=8  launch/mlp_launch.sh CONFIG [key=value ...]
# Index 0 (the head) starts the Ray head, waits until all MLP_WORKER_NUM nodes joined (else one line and exit 1),
# then runs the stage with RAY_ADDRESS set; the other nodes join the Ray cluster. The trainer's ranks run on the
# first PRISM_TRAINER_NODES nodes (default 1: `prism train` on the head spawns them there; more: torchrun on each
# of those nodes, PRISM_RANKS_PER_NODE ranks each, one process group, rendezvous on the head), the rollout
# engines wherever placement puts them (colocated: sharing the trainer ranks' devices on every trainer node;
# disaggregated: on the other nodes; docs/cluster.md). Trainer nodes exit with the trainer's status; the others
# stay until the head's cluster goes away, then leave (exit 0).
# SINGLENODE=true: no cluster, `prism train` on this node alone (it starts a local Ray for its engines).
# Optional: RAY_PORT (6379), PRISM_NODE_WAIT_S (seconds to wait for the nodes, 600), PRISM_NODE_IP (this node's
# address; the head uses MLP_WORKER_0_PRIMARY_HOST), PRISM_RAY_CPUS (logical CPUs per node, nproc),
# PRISM_RAY_RESOURCES (custom resources JSON), PRISM_RAY_TEMP (head's Ray dir), PRISM_TRAINER_NODES (1),
# PRISM_RANKS_PER_NODE (MLP_WORKER_GPU, or 1 without GPUs), PRISM_MASTER_PORT (torchrun's, RAY_PORT+1).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "mlp_launch: $*" >&2; exit "${2:-2}"; }
prism=.venv/bin/prism; py=.venv/bin/python; ray_bin=.venv/bin/ray
[ -x "$prism" ] || prism=$(command -v prism) || die "no .venv/bin/prism and no prism on PATH"
[ -x "$py" ] || py=$(command -v python3)
[ -x "$ray_bin" ] || ray_bin=$(command -v ray) || die "no ray executable (.venv/bin/ray or PATH)"
[ $# -ge 1 ] || die "usage: $0 CONFIG [key=value ...]"

if [ "${SINGLENODE:-false}" = true ]; then
  unset RAY_ADDRESS
  exec "$prism" train "$@"
fi
for v in MLP_WORKER_0_HOST MLP_WORKER_0_PRIMARY_HOST MLP_WORKER_NUM MLP_WORKER_RACK_RANK_INDEX MLP_WORKER_GPU; do
  [ -n "${!v:-}" ] || die "$v is not set (every node needs MLP_WORKER_0_HOST, MLP_WORKER_0_PRIMARY_HOST, MLP_WORKER_NUM, MLP_WORKER_RACK_RANK_INDEX, MLP_WORKER_GPU; or SINGLENODE=true)"
done
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
port=${RAY_PORT:-6379}
head=$MLP_WORKER_0_PRIMARY_HOST:$port
wait_s=${PRISM_NODE_WAIT_S:-600}
trainer_nodes=${PRISM_TRAINER_NODES:-1}
gpus=$MLP_WORKER_GPU
ranks_per_node=${PRISM_RANKS_PER_NODE:-$([ "$gpus" -gt 0 ] 2>/dev/null && echo "$gpus" || echo 1)}
[[ $trainer_nodes =~ ^[1-9][0-9]*$ && $trainer_nodes -le $MLP_WORKER_NUM ]] ||
  die "PRISM_TRAINER_NODES=$trainer_nodes must be a whole number from 1 to MLP_WORKER_NUM=$MLP_WORKER_NUM"
[[ $ranks_per_node =~ ^[1-9][0-9]*$ ]] || die "PRISM_RANKS_PER_NODE=$ranks_per_node must be a whole number >= 1"
node_args=(--num-gpus "$MLP_WORKER_GPU" --num-cpus "${PRISM_RAY_CPUS:-$(nproc)}" --disable-usage-stats
           --resources "${PRISM_RAY_RESOURCES:-{\}}")
ray_pid=""; own_temp=""
stop_ray() {  # only the Ray processes this script started: the `ray start --block` process and its children
  if [ -n "$ray_pid" ]; then
    "$py" -c "import sys; from prism_mcore.platform.processes import descendants, kill_all; \
p = int(sys.argv[1]); kill_all(descendants({p}) | {p})" "$ray_pid" 2>/dev/null || true
  fi
  [ -z "$own_temp" ] || rm -rf "$own_temp"
  ray_pid=""; own_temp=""
}
trap stop_ray EXIT
trap 'exit 143' TERM INT

# This node's share of the trainer, with RAY_ADDRESS and its raylet's temp dir (how its ranks find their own
# node's raylet, even among several on one host); exits with the trainer's status.
run_trainer() {
  local node_dir=$1; shift
  if [ "$trainer_nodes" = 1 ]; then
    RAY_ADDRESS=$head PRISM_RAY_NODE_DIR=$node_dir "$prism" train "$@" &
  else
    RAY_ADDRESS=$head PRISM_RAY_NODE_DIR=$node_dir "$py" -m torch.distributed.run --nnodes "$trainer_nodes" \
        --node-rank "$MLP_WORKER_RACK_RANK_INDEX" --nproc-per-node "$ranks_per_node" \
        --master-addr "$MLP_WORKER_0_PRIMARY_HOST" --master-port "${PRISM_MASTER_PORT:-$((port + 1))}" \
        --rdzv-conf "timeout=${wait_s%.*}" --log-dir "$node_dir/torchrun" \
        -m prism_mcore.cli train "$@" "parallel.world_size=$((trainer_nodes * ranks_per_node))" &
  fi
  train_pid=$!
  trap 'kill -TERM $train_pid 2>/dev/null; wait $train_pid; exit 143' TERM INT
  rc=0; wait $train_pid || rc=$?
  exit $rc
}

if [ "$MLP_WORKER_RACK_RANK_INDEX" = 0 ]; then
  if [ -n "${PRISM_RAY_TEMP:-}" ]; then temp=$PRISM_RAY_TEMP; else temp=$(mktemp -d /tmp/prism_launch_XXXXXX); own_temp=$temp; fi
  "$ray_bin" start --head --block --port "$port" --node-ip-address "$MLP_WORKER_0_PRIMARY_HOST" \
      --include-dashboard=false --temp-dir "$temp" "${node_args[@]}" >"$temp/ray_head.log" 2>&1 &
  ray_pid=$!; disown "$ray_pid"  # stopped by stop_ray, not waited for (no "Killed" line from bash)
  # Every node must be in the cluster before the stage places its engines.
  "$py" - "$head" "$MLP_WORKER_NUM" "$wait_s" "$ray_pid" "$temp/ray_head.log" <<'EOF' || exit 1
import os, socket, sys, time, ray
address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, alive = time.monotonic() + wait_s, 0
while time.monotonic() < deadline:
    try:  # the head died (port taken, bad resources, ...): a zombie counts as dead
        dead = open(f"/proc/{sys.argv[4]}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        dead = True
    if dead:
        lines = [x for x in open(sys.argv[5], errors="replace").read().splitlines() if x.strip()]
        print(f"mlp_launch: the Ray head did not start at {address}: {lines[-1] if lines else 'no output'}",
              file=sys.stderr)
        sys.exit(1)
    try:
        if not ray.is_initialized():  # ray.init waits half a minute on a GCS that is not listening yet
            host, port = address.rsplit(":", 1)
            socket.create_connection((host, int(port)), 2).close()
            ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
        alive = sum(n["Alive"] for n in ray.nodes())
        if alive >= want:
            sys.exit(0)
    except (OSError, RuntimeError):  # ConnectionError is an OSError
        pass
    time.sleep(1.0)
print(f"mlp_launch: {alive} of MLP_WORKER_NUM={want} nodes joined the Ray cluster at {address} within "
      f"{wait_s:.0f}s (PRISM_NODE_WAIT_S)", file=sys.stderr)
sys.exit(1)
EOF
  echo "mlp_launch: $MLP_WORKER_NUM nodes in the Ray cluster at $head; running prism train $*" >&2
  run_trainer "$temp" "$@"  # the EXIT trap then stops the head; the workers see it go and leave
fi

# Workers: join (retrying while the head comes up), then stay while the head's cluster is there.
node_ip=${PRISM_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
deadline=$((SECONDS + ${wait_s%.*}))
head_up() { "$py" -c "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()" \
              "$MLP_WORKER_0_PRIMARY_HOST" "$port" 2>/dev/null; }
until head_up; do
  [ $SECONDS -lt $deadline ] || die "node $MLP_WORKER_RACK_RANK_INDEX: no Ray head at $head within ${wait_s}s" 1
  sleep 1
done
temp=$(mktemp -d /tmp/prism_launch_XXXXXX); own_temp=$temp
"$ray_bin" start --block --address "$head" ${node_ip:+--node-ip-address "$node_ip"} --temp-dir "$temp" \
    "${node_args[@]}" >"$temp/ray_worker.log" 2>&1 &
ray_pid=$!; disown "$ray_pid"
echo "mlp_launch: node $MLP_WORKER_RACK_RANK_INDEX joined the Ray cluster at $head" >&2
if [ "$MLP_WORKER_RACK_RANK_INDEX" -lt "$trainer_nodes" ]; then
  echo "mlp_launch: node $MLP_WORKER_RACK_RANK_INDEX runs $ranks_per_node trainer rank(s)" >&2
  run_trainer "$temp" "$@"
fi
misses=0
while kill -0 "$ray_pid" 2>/dev/null; do
  if head_up; then misses=0; else misses=$((misses + 1)); fi
  [ $misses -lt 3 ] || break  # the head's cluster is gone: the job ended
  sleep 2
done
exit 0

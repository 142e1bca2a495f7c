#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine, to try launch/slurm_train.sbatch without a real one.
#   launch/slurm_local.sh up DIR [NNODES]    munged + slurmctld + NNODES slurmd (default 1), all state under DIR
#   export SLURM_CONF=DIR/slurm.conf         then sbatch / srun / squeue / scontrol as usual
#   launch/slurm_local.sh down DIR           cancels its jobs, stops its daemons (by their pid files only)
# Needs root and the Debian packages slurmctld slurmd slurm-client munge (`make slurm-deps`).
# SLURM_LOCAL_PORT (default 6817) is slurmctld's port; node i's slurmd listens on SLURM_LOCAL_PORT + i.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-login shell may not have on PATH

usage() { echo "usage: $0 up|down DIR [NNODES]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1; dir=$(mkdir -p "$2" && cd "$2" && pwd); nnodes=${3:-1}
export SLURM_CONF=$dir/slurm.conf

stop_daemons() {  # SIGTERM to all at once (each takes a second or two to shut down), SIGKILL after 10 s
  local f pid name pids=()
  for f in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); name=$(basename "$f" .pid); rm -f "$f"
    # a stale pid file (daemon died, pid reused) must not take another process with it
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 50); do
    kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.2
  done
  [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
}

down() {
  # Cancel first so slurmstepd kills the job processes; stopping slurmd alone would orphan them.
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  stop_daemons
}

fail() {  # name what failed, show the log that says why, leave nothing running
  echo "slurm_local: $1" >&2
  [ -n "${2:-}" ] && [ -f "$2" ] && { echo "--- tail of $2" >&2; tail -n 20 "$2" >&2; }
  down
  exit 1
}

up() {
  [ "$(id -u)" = 0 ] || { echo "slurm_local: needs root (slurmd starts job steps as the submitting user)" >&2; exit 1; }
  for b in munged slurmctld slurmd sbatch; do
    command -v $b >/dev/null || { echo "slurm_local: $b not found (make slurm-deps)" >&2; exit 1; }
  done
  down  # a cluster left running in DIR would hold the ports
  local host port cpus mem nodes="" i
  host=$(hostname -s); port=${SLURM_LOCAL_PORT:-6817}
  # Emulated nodes share the cores; at least 2 CPUs each so a 2-rank job fits on one node.
  cpus=$(( $(nproc) > 2 ? $(nproc) : 2 ))
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / nnodes ))
  mkdir -p "$dir"/{run,log,state,munge}
  chmod 0700 "$dir/munge"
  # munge: our own key and socket, so the system's munged (if any) is neither needed nor disturbed.
  [ -f "$dir/munge/munge.key" ] || head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chmod 0400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/run/munge.sock" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || fail "munged did not start" "$dir/log/munged.log"

  # Every node is NodeAddr=127.0.0.1 with its own slurmd port: one host emulates NNODES nodes, and jobs
  # must take addresses from the controller (node names n1.. do not resolve), as on clusters where they don't.
  for i in $(seq "$nnodes"); do
    nodes+="NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
    mkdir -p "$dir/spool/n$i"
  done
  cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
AuthType=auth/munge
AuthInfo=socket=$dir/run/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# No systemd or cgroups here (containers): plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Emulated nodes claim the CPUs written here, not what each slurmd counts (they all count the same cores).
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
$nodes
PartitionName=local Nodes=n[1-$nnodes] Default=YES MaxTime=INFINITE State=UP
EOF
  # -c: a throwaway cluster starts empty, whatever an earlier one in DIR left in its state.
  slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start" "$dir/log/slurmctld.log"
  for i in $(seq "$nnodes"); do
    slurmd -f "$SLURM_CONF" -N "n$i" || fail "slurmd n$i did not start" "$dir/log/slurmd-n$i.log"
  done

  # The daemons fork before they bind ports or register, so their failures show up only here.
  local timeout=${SLURM_LOCAL_TIMEOUT:-30} t0=$SECONDS d pidf
  while :; do
    for d in munged slurmctld $(printf 'slurmd-n%s ' $(seq "$nnodes")); do
      pidf=$dir/run/$d.pid
      if [ -f "$pidf" ]; then kill -0 "$(cat "$pidf")" 2>/dev/null || fail "$d exited" "$dir/log/$d.log"
      elif [ $((SECONDS - t0)) -ge 5 ]; then fail "$d wrote no pid file" "$dir/log/$d.log"; fi
    done
    [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = "$nnodes" ] && break
    [ $((SECONDS - t0)) -lt "$timeout" ] || fail "nodes not idle after $timeout s: $(sinfo -h -N -o '%N=%T' 2>&1 | xargs)" \
      "$dir/log/slurmctld.log"
    sleep 0.5
  done
  echo "slurm_local: $nnodes node(s) idle; export SLURM_CONF=$SLURM_CONF"
}

case $cmd in
  up) up ;;
  down) down ;;
  *) usage ;;
esac

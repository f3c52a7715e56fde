#!/usr/bin/env bash
# A real Slurm on this machine (Debian packages), for the tests that submit real jobs. Needs root.
#
#   bash .ci/start-slurm.sh                 one node: slurmctld + slurmd on this host (`sinfo` as is)
#   NODES=2 bash .ci/start-slurm.sh         two "hosts": slurmctld and two slurmd, each in its own
#                                           network + UTS namespace, on a private bridge
#   NODES=2 bash .ci/start-slurm.sh stop    tear the two-node cluster down (`stop` alone: one node)
#   NODES=2 bash .ci/start-slurm.sh status  exit 0 if it answers with its nodes idle
#   NODES=2 bash .ci/start-slurm.sh lose-node memdlm-n2   that host dies (every process SIGKILLed);
#                                            DOWN after SlurmdTimeout (10 s), its jobs requeued
#   NODES=2 bash .ci/start-slurm.sh node-back memdlm-n2   its slurmd again; the node returns
#
# Both can run at once (CI starts both): the one-node cluster lives in this host's network
# namespace with /etc/slurm/slurm.conf; the two-node one in namespaces of its own with
# /etc/slurm-2node/slurm.conf. Starting is idempotent: a cluster that answers is left alone; a
# half-started two-node cluster is torn down and started again.
#
# Two-node layout (all traffic stays on the bridge inside memdlm-ctl, or on loopback):
#   netns memdlm-ctl  bridge br0 10.77.0.1/24, slurmctld (UTS host name memdlm-ctl)
#   netns memdlm-n1   eth0 10.77.0.11/24 (veth to br0), slurmd (UTS host name memdlm-n1)
#   netns memdlm-n2   eth0 10.77.0.12/24 (veth to br0), slurmd (UTS host name memdlm-n2)
# Host names go into /etc/hosts (a marked block, removed on stop) so every namespace resolves them;
# one munged (this host's, its socket is a file) serves all. Client commands (sbatch, squeue,
# scancel, sacct, scontrol, sinfo, srun) must reach 10.77.0.1, so the script writes wrappers that
# run them inside memdlm-ctl with SLURM_CONF set:  source /run/memdlm-slurm-2node/env  puts them
# first on PATH; inside a job (already on a node) they run the real command directly. Never export
# SLURM_CONF=/etc/slurm-2node/slurm.conf in this host's shell: /usr/bin/sinfo would then address
# 10.77.0.1 from a namespace with no route to it.
set -euo pipefail
NODES="${NODES:-1}"
action="${1:-start}"
PKGS="slurmctld slurmd slurm-client munge"

install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q $PKGS >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q $PKGS >/dev/null; }
}

start_munge() {
  mkdir -p /run/munge
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # the daemon of pid file $1 runs

# ---------------------------------------------------------------------------------------------
# One node (unchanged behaviour; daemons found by their pid files, not by name, so the two-node
# cluster's slurmctld/slurmd do not count as this one's).
one_node() {
  case "$action" in
    stop)
      for f in /run/slurmd.pid /run/slurmctld.pid; do alive "$f" && kill "$(cat "$f")"; done
      echo "slurm: one-node cluster stopped"; return ;;
    status) sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; return ;;
    start) ;;
    *) echo "usage: [NODES=1|2] $0 [start|stop|status] | NODES=2 $0 lose-node|node-back memdlm-n1|memdlm-n2" >&2; exit 2 ;;
  esac
  if command -v sinfo >/dev/null && sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; then
    echo "slurm: already up"; return
  fi
  install_slurm
  local node cpus
  node=$(hostname -s)
  cpus=$(nproc)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=memdlm-ci
SlurmctldHost=${node}
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Test-sized waits, as in the two-node cluster below: a requeued job starts again after
# cred_expire (default 120 s), picked up by the backfill pass (bf_interval, default 30 s); tasks
# that ignore SIGTERM (submitit's do) are killed KillWait (default 30 s) after it. The defaults made
# the requeue test wait ~4 min.
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=5
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${node} CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  start_munge
  alive /run/slurmctld.pid || SLURM_CONF=/etc/slurm/slurm.conf slurmctld
  alive /run/slurmd.pid || SLURM_CONF=/etc/slurm/slurm.conf slurmd
  for _ in $(seq 1 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; then echo "slurm: up ($node, $cpus CPUs)"; return; fi
    sleep 1
  done
  echo "slurm: did not come up; see /var/log/slurm" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Two nodes in namespaces.
NET="${SLURM2_SUBNET:-10.77.0}"       # a /24 used only on the bridge inside memdlm-ctl
CTL=memdlm-ctl
HOSTS=(memdlm-n1 memdlm-n2)
CONF_DIR=/etc/slurm-2node
CONF="$CONF_DIR/slurm.conf"
RUN=/run/memdlm-slurm-2node           # pid files, client wrappers, env file
SPOOL=/var/spool/memdlm-slurm-2node
LOGS=/var/log/slurm
MARK="# memdlm-slurm-2node"

ns_exec() { local ns=$1; shift; nsenter --net="/var/run/netns/$ns" "$@"; }  # not `ip netns exec`: it hides /sys/fs/cgroup

two_node_up() {  # both nodes answer idle (or busy) through the wrappers
  [ -x "$RUN/bin/sinfo" ] || return 1
  local states
  states=$("$RUN/bin/sinfo" -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -cE '^memdlm-n[12] (idle|mixed|alloc)' <<<"$states")" = 2 ]
}

two_node_stop() {
  for f in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"; do
    alive "$f" && kill "$(cat "$f")" 2>/dev/null || true
  done
  local ns pids
  for ns in "$CTL" "${HOSTS[@]}"; do  # job steps still running in a node's namespace, then the namespace
    [ -e "/var/run/netns/$ns" ] || continue
    for _ in $(seq 1 50); do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] && break
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null || true
      sleep 0.2
    done
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns"
  done
  if grep -q "$MARK" /etc/hosts; then  # in place: /etc/hosts may be a bind mount
    local kept
    kept=$(grep -v "$MARK" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
  fi
  rm -rf "$RUN" "$SPOOL"
}

two_node_start() {
  install_slurm
  start_munge
  local cpus i ns
  cpus=$(nproc)
  # The network: a bridge inside memdlm-ctl, one veth pair per node (created inside memdlm-ctl,
  # the peer moved straight into the node's namespace: nothing touches this host's namespace).
  for ns in "$CTL" "${HOSTS[@]}"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip -n "$CTL" link add br0 type bridge
  ip -n "$CTL" addr add "$NET.1/24" dev br0
  ip -n "$CTL" link set br0 up
  for i in 1 2; do
    ns=${HOSTS[$((i - 1))]}
    ip -n "$CTL" link add "veth-n$i" type veth peer name eth0 netns "$ns"
    ip -n "$CTL" link set "veth-n$i" master br0 up
    ip -n "$ns" addr add "$NET.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  { echo "$NET.1 $CTL $MARK"; echo "$NET.11 ${HOSTS[0]} $MARK"; echo "$NET.12 ${HOSTS[1]} $MARK"; } >> /etc/hosts

  mkdir -p "$CONF_DIR" "$RUN/bin" "$SPOOL/ctld" "$LOGS" "${HOSTS[@]/#/$SPOOL/}"
  cat > "$CONF" <<CONF
ClusterName=memdlm-ci2
SlurmctldHost=${CTL}
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A node whose slurmd stops answering is DOWN after 10 s (default 300): a lost node's job is then
# requeued (JobRequeue=1) and, submitted with a node range, comes back on the nodes left.
SlurmdTimeout=10
# Test-sized waits: a requeued job may start again after cred_expire (default 120 s) and is then
# started by the backfill pass (bf_interval, default 30 s); tasks that ignore SIGTERM (submitit's
# do) are killed KillWait (default 30 s) after it.
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=5
KillWait=5
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/%n
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd-%n.pid
SlurmctldLogFile=${LOGS}/2node-slurmctld.log
SlurmdLogFile=${LOGS}/2node-slurmd-%n.log
NodeName=memdlm-n[1-2] CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=memdlm-n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  # Client wrappers: from anywhere outside our namespaces, run the command inside memdlm-ctl.
  local cmd
  for cmd in sbatch squeue scancel sacct scontrol sinfo srun salloc; do
    cat > "$RUN/bin/$cmd" <<WRAP
#!/bin/sh
export SLURM_CONF=$CONF
case "\$(ip netns identify \$\$ 2>/dev/null)" in memdlm-*) exec /usr/bin/$cmd "\$@" ;; esac
exec nsenter --net=/var/run/netns/$CTL /usr/bin/$cmd "\$@"
WRAP
    chmod +x "$RUN/bin/$cmd"
  done
  # PATH only: SLURM_CONF exported here would send this host's own /usr/bin clients to the bridge
  # address, which is not reachable from this namespace. The wrappers set it for themselves.
  printf 'export PATH=%s/bin:"$PATH"\n' "$RUN" > "$RUN/env"

  # Daemons, each in its namespace under its own host name (a new UTS namespace per daemon).
  export SLURM_CONF="$CONF"
  ns_exec "$CTL" unshare --uts sh -c "hostname $CTL && exec slurmctld -f $CONF"
  for ns in "${HOSTS[@]}"; do
    ns_exec "$ns" unshare --uts sh -c "hostname $ns && exec slurmd -f $CONF -N $ns"
  done
}

node_lose() {  # the host dies: every process in its namespace (slurmd, job steps, tasks), SIGKILL
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null || true)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  echo "slurm: $1 lost (its slurmd and every process on it killed)"
}

node_back() {  # the host comes back: its slurmd again (ReturnToService=2 makes it usable)
  local ns=$1
  alive "$RUN/slurmd-$ns.pid" && { echo "slurm: $ns is up"; return; }
  SLURM_CONF="$CONF" ns_exec "$ns" unshare --uts sh -c "hostname $ns && exec slurmd -f $CONF -N $ns"
  for _ in $(seq 1 40); do
    "$RUN/bin/sinfo" -h -n "$ns" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|alloc)' && { echo "slurm: $ns back"; return; }
    sleep 0.5
  done
  echo "slurm: $ns did not come back; see $LOGS/2node-slurmd-$ns.log" >&2
  exit 1
}

two_node() {
  case "$action" in
    stop) two_node_stop; echo "slurm: two-node cluster stopped"; return ;;
    status) two_node_up; return ;;
    lose-node|node-back)
      case "${2:-}" in memdlm-n1|memdlm-n2) ;; *) echo "usage: NODES=2 $0 $action memdlm-n1|memdlm-n2" >&2; exit 2 ;; esac
      if [ "$action" = lose-node ]; then node_lose "$2"; else node_back "$2"; fi
      return ;;
    start) ;;
    *) echo "usage: [NODES=1|2] $0 [start|stop|status]" >&2; exit 2 ;;
  esac
  if two_node_up; then echo "slurm: two-node cluster already up (source $RUN/env)"; return; fi
  two_node_stop  # whatever a half start or a crash left behind
  two_node_start
  for _ in $(seq 1 40); do
    if two_node_up; then
      echo "slurm: two-node cluster up (${HOSTS[*]} on $NET.0/24, $(nproc) CPUs each); source $RUN/env"
      return
    fi
    sleep 1
  done
  echo "slurm: two-node cluster did not come up; see $LOGS/2node-*.log" >&2
  exit 1
}

case "$NODES" in
  1) one_node ;;
  2) two_node "$@" ;;
  *) echo "NODES=$NODES: 1 or 2" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the integration test and for trying
# sweeps before a real cluster:
#
#   bash slurm/local-cluster.sh up       # install (apt) if needed, start munged/slurmctld/slurmd
#   bash slurm/local-cluster.sh status   # daemons, sinfo, squeue; exit 0 only when usable
#   bash slurm/local-cluster.sh down     # stop the daemons this script started
#
# Needs root on Debian/Ubuntu (CI is). No systemd: the daemons are started directly and
# stopped by the PIDs they were started with. Everything this script writes lives in
# $EDM_SLURM_DIR (default /tmp/edm-slurm); the only file outside it is the symlink
# /etc/slurm/slurm.conf -> $EDM_SLURM_DIR/slurm.conf, because sinfo/sbatch (called by submitit
# from any process) read that path. A slurm.conf that is not ours is never touched.
#
# Settings (environment): EDM_SLURM_DIR, EDM_SLURM_CPUS (default nproc),
# EDM_SLURM_MEM_MB (default 90% of MemTotal), EDM_SLURM_PARTITION (default "local"),
# EDM_SLURM_WAIT_S (default 60, how long `up` waits for the node to become idle).
set -euo pipefail

DIR=${EDM_SLURM_DIR:-/tmp/edm-slurm}
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MARK="# edm local-cluster"            # first line of our slurm.conf: proves the file is ours
NODE=$(hostname -s)                   # slurmctld insists the controller name is the short hostname
PARTITION=${EDM_SLURM_PARTITION:-local}
WAIT_S=${EDM_SLURM_WAIT_S:-60}

log() { echo "[local-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install ------------------
install_packages() {
  local missing=()
  for bin in slurmctld slurmd sinfo sbatch munged munge; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root to apt-get install them"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (Debian/Ubuntu only)"
  log "installing slurm-wlm and munge (missing: ${missing[*]})"
  # Keep the packages' maintainer scripts from starting daemons themselves (no init system
  # here; we start them below). Only add the standard policy-rc.d if none exists.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge \
      >/dev/null; } || rc=$?
  [[ $added_policy -eq 1 ]] && rm -f "$policy"
  [[ $rc -eq 0 ]] || die "apt-get install slurm-wlm munge failed (rc=$rc)"
}

# ---------------------------------------------------------------- config -------------------
write_config() {
  local cpus=${EDM_SLURM_CPUS:-$(nproc)}
  # Below the machine's memory, or slurmd drains the node ("Low RealMemory").
  local mem=${EDM_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}
  mkdir -p "$DIR"/{state,spool,log}
  cat >"$CONF.tmp" <<EOF
$MARK: written by slurm/local-cluster.sh; rerun \`up\` instead of editing.
ClusterName=edm-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${EDM_SLURM_CTLD_PORT:-6817}
SlurmdPort=${EDM_SLURM_D_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
# No cgroups: plain process tracking, no task binding (works in containers and sandboxes).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct is unavailable; submitit warns and falls back to its result files.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Finished jobs stay visible to squeue/scontrol for 5 min (debugging without sacct).
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"

  mkdir -p "$(dirname "$ETC_CONF")"
  if [[ -L $ETC_CONF || ! -e $ETC_CONF ]]; then
    local target
    target=$(readlink "$ETC_CONF" || true)
    if [[ -n $target && $target != "$CONF" ]] \
        && head -1 "$target" 2>/dev/null | grep -qv "^$MARK"; then
      die "$ETC_CONF links to $target, which this script did not write; not replacing it"
    fi
    ln -sfn "$CONF" "$ETC_CONF"
  elif ! head -1 "$ETC_CONF" | grep -q "^$MARK"; then
    die "$ETC_CONF exists and was not written by this script: this machine already has a" \
        "SLURM configuration, use that cluster instead"
  else
    ln -sfn "$CONF" "$ETC_CONF"
  fi
  log "config: $CONF (node $NODE, CPUs=$cpus, RealMemory=${mem}M, partition $PARTITION)"
}

# ---------------------------------------------------------------- daemons ------------------
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then log "munged: already running"; return 0; fi
  local key=/etc/munge/munge.key
  if [[ ! -s $key ]]; then
    log "creating $key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key"
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
  fi
  # munged refuses to start unless its key and directories belong to it and are private.
  mkdir -p /var/lib/munge /var/log/munge /run/munge
  chown munge:munge /etc/munge "$key" /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0400 "$key"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
  # Remember that we started it, so `down` stops it and nothing else.
  cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null \
    || pgrep -u munge -n -x munged >"$DIR/munged.pid"
  log "munged: started (pid $(cat "$DIR/munged.pid"))"
}

start_slurm() {
  if alive "$DIR/slurmctld.pid"; then log "slurmctld: already running"
  else SLURM_CONF=$CONF slurmctld; log "slurmctld: started"; fi
  if alive "$DIR/slurmd.pid"; then log "slurmd: already running"
  else SLURM_CONF=$CONF slurmd -N "$NODE"; log "slurmd: started"; fi
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }
usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]; }

wait_idle() {
  local state="" t0=$SECONDS resumed=0
  while ((SECONDS - t0 < WAIT_S)); do
    state=$(node_state)
    case $state in
      idle|mixed|allocated|completing) log "node $NODE is $state"; return 0 ;;
      down*|drain*|drained*)
        # Left over from a previous run's saved state: bring it back once.
        if ((resumed == 0)); then
          scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1
        fi ;;
    esac
    sleep 0.5
  done
  log "node $NODE not idle after ${WAIT_S}s (state: '${state:-none}')"
  sinfo -R >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait up to 10 s, then KILL; by PID only
  local name=$1 file=$2 pid
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop, killing $pid"; kill -KILL "$pid"; fi
  rm -f "$file"
  log "$name: stopped (pid $pid)"
}

# ---------------------------------------------------------------- commands -----------------
cmd_up() {
  local t0=$SECONDS
  install_packages
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && usable; then
    log "already up"; sinfo; return 0
  fi
  write_config
  start_munge
  start_slurm
  wait_idle || die "cluster did not come up; logs in $DIR/log"
  log "up in $((SECONDS - t0)) s"
  sinfo
}

cmd_down() {
  # scontrol shutdown would also do, but needs a live controller; PIDs always work.
  stop_pidfile slurmd "$DIR/slurmd.pid"
  stop_pidfile slurmctld "$DIR/slurmctld.pid"
  stop_pidfile munged "$DIR/munged.pid"   # only present when this script started munged
  log "down (config and logs kept in $DIR)"
}

cmd_status() {
  local ok=0 d
  for d in slurmctld slurmd munged; do
    if alive "$DIR/$d.pid"; then log "$d: running (pid $(cat "$DIR/$d.pid"))"
    else log "$d: not running (or not started by this script)"; fi
  done
  command -v sinfo >/dev/null || { log "sinfo not installed"; return 1; }
  sinfo 2>&1 || ok=1
  squeue 2>&1 || ok=1
  usable || ok=1
  return $ok
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

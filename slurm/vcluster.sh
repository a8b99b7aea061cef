#!/usr/bin/env bash
# A real Slurm on a virtual cluster on this machine (root): 4 network-
# namespace nodes (scripts/cluster.sh), munged, slurmctld in the root
# namespace on the bridge address, one slurmd per node. Submits
# slurm/vcluster-life.sbatch with `sbatch --wait` (srun --mpi=pmix cellnet
# probe + life over 4 nodes x 4 tasks), checks it ends "verified", prints
# the time from sbatch to the end of the job, and stops everything it
# started by PID, also on failure or Ctrl-C.
#
#   slurm/vcluster.sh              run the job and tear down
#   KEEP=1 slurm/vcluster.sh       leave the work directory (logs) behind
#
# Variables [defaults]:
#   CLUSTER_PREFIX [sl]  CLUSTER_SUBNET [auto]  (see scripts/cluster.sh)
#   VC_NODES [4]  VC_TASKS_PER_NODE [4]
#   VC_CTLD_PORT [46817]   slurmctld port (root namespace, bridge address)
#   VC_SLURMD_PORT [46818] slurmd port (inside each node namespace)
#   VC_WORK [/tmp/cellnet-slurm-<prefix>]  config, state, spool, logs, munge
#   CELLNET [target/release/cellnet]       binary the job runs
#   VC_JOB_TIMEOUT [420]   seconds sbatch --wait may take
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CLUSTER="$REPO/scripts/cluster.sh"
export CLUSTER_PREFIX="${CLUSTER_PREFIX:-sl}"
export CLUSTER_SUBNET="${CLUSTER_SUBNET:-auto}"
NODES="${VC_NODES:-4}"
TPN="${VC_TASKS_PER_NODE:-4}"
CTLD_PORT="${VC_CTLD_PORT:-46817}"
SLURMD_PORT="${VC_SLURMD_PORT:-46818}"
WORK="${VC_WORK:-/tmp/cellnet-slurm-$CLUSTER_PREFIX}"
export CELLNET="${CELLNET:-$REPO/target/release/cellnet}"
JOB_TIMEOUT="${VC_JOB_TIMEOUT:-420}"

say() { echo "vcluster: $*"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
fail() {
    echo "vcluster: FAILED: $*" >&2
    exit 1
}

PIDS=()      # every daemon we started, stopped in reverse order
SBATCH_PID=""
CLUSTER_UP=0
cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    if [ -n "$SBATCH_PID" ]; then
        kill -TERM "$SBATCH_PID" 2>/dev/null || true
        wait "$SBATCH_PID" 2>/dev/null || true
        [ "$rc" -ne 0 ] || rc=1
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # Job steps left behind by a killed job: slurmstepd and their tasks
    # carry our SLURM_CONF; only those are ours.
    for pid in $(grep -l "SLURM_CONF=$WORK/slurm.conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        [ "$pid" != $$ ] && kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$CLUSTER_UP" = 1 ]; then
        "$CLUSTER" down || { echo "vcluster: cluster.sh down failed" >&2; rc=1; }
    fi
    if [ "$rc" -ne 0 ] && [ -d "$WORK/log" ]; then
        for f in "$WORK"/log/*; do
            echo "----- tail of $f" >&2
            tail -n 15 "$f" >&2 || true
        done
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        say "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || fail "needs root (network namespaces, munge, slurmd)"
for c in munged munge unmunge slurmctld slurmd sbatch scontrol sinfo nsenter unshare; do
    command -v "$c" >/dev/null || fail "$c not found (scripts/setup-debian.sh installs slurm-wlm and munge)"
done
[ -x "$CELLNET" ] || fail "$CELLNET is not built (cargo build --release)"
[ ! -e "$WORK" ] || fail "$WORK exists: another run with CLUSTER_PREFIX=$CLUSTER_PREFIX? (remove it if stale)"

# --- nodes -----------------------------------------------------------------
t_start=$(date +%s.%N)
CLUSTER_UP=1
"$CLUSTER" up "$NODES" || fail "scripts/cluster.sh up $NODES"
eval "$("$CLUSTER" info | grep -E '^(NET|HEAD|HOSTS)=')"
HEAD_NAME="cn-$CLUSTER_PREFIX-head"
NAMES=()
for k in $(seq "$NODES"); do NAMES+=("cn-$CLUSTER_PREFIX-n$k"); done

mkdir -p "$WORK"/{munge,state,spool,run,log,tmp,out}
for n in "${NAMES[@]}"; do mkdir -p "$WORK/spool/$n" "$WORK/tmp/$n"; done

# --- munge -----------------------------------------------------------------
chmod 0755 "$WORK" "$WORK/munge"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$WORK/munge"
chmod 0400 "$WORK/munge/munge.key"
touch "$WORK/log/munged.log" && chown munge:munge "$WORK/log/munged.log"
runuser -u munge -- munged -F --socket="$WORK/munge/munge.socket.2" \
    --key-file="$WORK/munge/munge.key" --pid-file="$WORK/munge/munged.pid" \
    --seed-file="$WORK/munge/munged.seed" --log-file="$WORK/log/munged.log" \
    </dev/null >>"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$WORK/munge/munge.socket.2" ] && break; sleep 0.1; done
out=$(munge -S "$WORK/munge/munge.socket.2" -n 2>&1 | unmunge -S "$WORK/munge/munge.socket.2" 2>&1) \
    || fail "munged does not answer on $WORK/munge/munge.socket.2: $out"

# --- slurm.conf ------------------------------------------------------------
node_lines=""
for k in $(seq "$NODES"); do
    node_lines+="NodeName=${NAMES[$((k - 1))]} NodeAddr=$NET.$k CPUs=$TPN Sockets=1 CoresPerSocket=$TPN ThreadsPerCore=1 State=UNKNOWN"$'\n'
done
export SLURM_CONF="$WORK/slurm.conf"
sed -e "s|@WORK@|$WORK|g" -e "s|@PREFIX@|$CLUSTER_PREFIX|g" -e "s|@HEAD_NAME@|$HEAD_NAME|g" \
    -e "s|@HEAD_ADDR@|$HEAD|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$REPO/slurm/vcluster.conf.in" | awk -v nodes="$node_lines" '{ if ($0 == "@NODE_LINES@") printf "%s", nodes; else print }' \
    >"$SLURM_CONF"

# --- slurmctld (root namespace, hostname = SlurmctldHost) -------------------
unshare --uts --mount sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && exec slurmctld -D -i' \
    "$HOSTS" "$HEAD_NAME" </dev/null >>"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
ok=0
for _ in $(seq 100); do
    if timeout 5 scontrol ping </dev/null 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.2
done
[ "$ok" = 1 ] || fail "slurmctld did not come up on $HEAD:$CTLD_PORT: $(tail -n 5 "$WORK/log/slurmctld.out" "$WORK/log/slurmctld.log" 2>&1)"

# --- one slurmd per node namespace ----------------------------------------
for k in $(seq "$NODES"); do
    n="${NAMES[$((k - 1))]}"
    "$CLUSTER" exec "$k" slurmd -D -N "$n" </dev/null >>"$WORK/log/slurmd-$n.out" 2>&1 &
    PIDS+=($!)
done
ok=0
for _ in $(seq 150); do
    idle=$(timeout 5 sinfo -h -N -t idle -o '%N' </dev/null 2>/dev/null | sort -u | wc -l)
    [ "$idle" -eq "$NODES" ] && { ok=1; break; }
    sleep 0.2
done
[ "$ok" = 1 ] || fail "not all $NODES slurmd idle after 30 s: $(timeout 5 sinfo -N </dev/null 2>&1)"
t_ready=$(date +%s.%N)
say "$NODES nodes idle ($(timeout 5 sinfo -h -o '%D %T %N' </dev/null)) after $(secs "$t_start" "$t_ready") s"

# --- the job ---------------------------------------------------------------
cd "$REPO"
t0=$(date +%s.%N)
set +e
# In the background and waited for, so INT/TERM interrupt the wait at once
# (cleanup then stops sbatch by its PID).
timeout --kill-after=10 "$JOB_TIMEOUT" sbatch --wait --parsable -N "$NODES" --ntasks-per-node="$TPN" \
    --output="$WORK/out/job-%j.out" slurm/vcluster-life.sbatch </dev/null >"$WORK/out/sbatch.out" 2>"$WORK/out/sbatch.err" &
SBATCH_PID=$!
wait "$SBATCH_PID"
rc=$?
SBATCH_PID=""
set -e
job=$(head -n 1 "$WORK/out/sbatch.out")
t1=$(date +%s.%N)
elapsed=$(secs "$t0" "$t1")
out_file="$WORK/out/job-${job%%;*}.out"
[ -f "$out_file" ] && sed 's/^/  | /' "$out_file"
[ "$rc" -eq 0 ] || fail "timeout $JOB_TIMEOUT sbatch --wait slurm/vcluster-life.sbatch exited $rc after ${elapsed}s: $(cat "$WORK/out/sbatch.err")"
grep -q '^verified' "$out_file" 2>/dev/null || grep -q 'verified' "$out_file" \
    || fail "job ${job} finished but did not print 'verified' (output above)"
probes=$(grep -c '^cellnet probe: rank .* leader ' "$out_file" || true)
[ "$probes" -eq $((NODES * TPN)) ] || fail "expected $((NODES * TPN)) probe lines, got $probes"
say "job $job verified: sbatch --wait took ${elapsed} s (nodes up to idle: $(secs "$t_start" "$t_ready") s)"

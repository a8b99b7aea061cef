#!/usr/bin/env bash
# A virtual cluster on this machine: K simulated nodes, each a network
# namespace joined to one bridge in the root namespace (needs root).
#
#   scripts/cluster.sh up K          bring up nodes 1..K (names cn-<prefix>-n1..nK)
#   scripts/cluster.sh down          remove every node, the bridge and the state dir
#   scripts/cluster.sh exec NODE cmd...
#                                    run cmd inside NODE (1..K or its name) with
#                                    the node's hostname and /etc/hosts
#   scripts/cluster.sh rsh NODE cmd...
#                                    same, cmd given as one shell string (what
#                                    mpirun's plm_rsh_agent calls in place of ssh)
#   scripts/cluster.sh nft-loss PCT  drop PCT % of incoming UDP and TCP in every node
#   scripts/cluster.sh info          print the variables below for the running cluster
#
# Node K has address 198.18.<subnet>.K/24 on its eth0; the bridge has .254
# (name cn-<prefix>-head in the hosts file). Each namespace has its own
# loopback, so 127.255.255.255 broadcasts stay inside one node.
#
# Variables (defaults in brackets; change them so two runs do not collide):
#   CLUSTER_PREFIX [cl]      namespace names cn-<prefix>-nK, veths cn<prefix>K
#   CLUSTER_SUBNET [77]      third octet of 198.18.<subnet>.0/24, or `auto`:
#                            the first of 100..250 no route uses yet
#   CLUSTER_BRIDGE [cnbr-<prefix>]
#   CLUSTER_STATE  [/tmp/cellnet-cluster-<prefix>]  hosts file, config, rsh launcher
set -euo pipefail

PREFIX="${CLUSTER_PREFIX:-cl}"
STATE="${CLUSTER_STATE:-/tmp/cellnet-cluster-$PREFIX}"
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

# run CMD...: run it; on failure name the command and show its stderr.
run() {
    local err
    if ! err="$("$@" 2>&1 >/dev/null)"; then
        die "failed: $* -- ${err:-no output}"
    fi
}

load_state() {
    [ -f "$STATE/env" ] || die "no cluster with prefix '$PREFIX' is up ($STATE/env missing; run 'up K' first)"
    # shellcheck disable=SC1091
    . "$STATE/env"
}

ns_name() { echo "cn-$PREFIX-n$1"; }

# node_ns NODE: NODE is 1..K or a namespace name; prints the namespace name.
node_ns() {
    local node="$1"
    if [[ "$node" =~ ^[0-9]+$ ]]; then
        [ "$node" -ge 1 ] && [ "$node" -le "$NODES" ] || die "node $node is not in 1..$NODES"
        ns_name "$node"
    else
        [ -e "/run/netns/$node" ] || die "node '$node' does not exist (no /run/netns/$node)"
        echo "$node"
    fi
}

pick_subnet() {
    local s
    for s in $(seq 100 250); do
        if [ -z "$(ip -4 route show to match "198.18.$s.1" | grep -v '^default')" ] \
            && ! ip -4 addr show | grep -q "inet 198\.18\.$s\."; then
            echo "$s"
            return
        fi
    done
    die "no free 198.18.S.0/24 for S in 100..250"
}

wait_gone() { # wait (up to 5 s) until link $1 has vanished from the root namespace
    local i
    for i in $(seq 50); do
        ip link show "$1" >/dev/null 2>&1 || return 0
        sleep 0.1
    done
    die "link $1 still present 5 s after its namespace was deleted"
}

cmd_down() {
    local k ns veth
    [ -f "$STATE/env" ] && . "$STATE/env"
    local bridge="${BRIDGE:-${CLUSTER_BRIDGE:-cnbr-$PREFIX}}"
    # Every namespace of this prefix, even if env is gone or K differs.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^cn-$PREFIX-n[0-9]+$" || true); do
        k="${ns##*-n}"
        veth="cn$PREFIX$k"
        ip netns delete "$ns" 2>/dev/null || echo "cluster.sh: warning: ip netns delete $ns failed" >&2
        ip link delete "$veth" 2>/dev/null || true
        wait_gone "$veth"
    done
    if ip link show "$bridge" >/dev/null 2>&1; then
        run ip link delete "$bridge"
    fi
    rm -rf "$STATE"
}

cmd_up() {
    local nodes="${1:-}"
    [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 250 ] || die "usage: up K (1..250 nodes)"
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
    command -v nsenter >/dev/null && command -v unshare >/dev/null || die "nsenter/unshare missing (util-linux)"
    [ ${#PREFIX} -le 8 ] || die "CLUSTER_PREFIX '$PREFIX' longer than 8 characters (interface names are limited to 15)"
    [ ! -e "$STATE/env" ] || die "a cluster with prefix '$PREFIX' is already up (scripts/cluster.sh down first)"
    # Concurrent `up`s on this host must not pick the same subnet: choose
    # and claim it (bridge address) under a lock.
    exec 9>"${CLUSTER_LOCK:-/tmp/cellnet-cluster.lock}"
    flock -w 30 9 || die "could not lock ${CLUSTER_LOCK:-/tmp/cellnet-cluster.lock} within 30 s"
    local subnet="${CLUSTER_SUBNET:-77}"
    [ "$subnet" = auto ] && subnet="$(pick_subnet)"
    [[ "$subnet" =~ ^[0-9]+$ ]] && [ "$subnet" -le 255 ] || die "CLUSTER_SUBNET=$subnet is not 0..255 or auto"
    local bridge="${CLUSTER_BRIDGE:-cnbr-$PREFIX}"
    local net="198.18.$subnet"
    if ip -4 addr show | grep -q "inet $net\."; then
        die "$net.0/24 is already in use here: $(ip -4 -o addr show | grep "inet $net\." | awk '{print $2}' | head -1) (set CLUSTER_SUBNET)"
    fi
    # Anything failing from here on leaves nothing behind.
    trap 'echo "cluster.sh: up failed, tearing down" >&2; cmd_down' EXIT
    mkdir -p "$STATE"
    cat >"$STATE/env" <<EOF
NODES=$nodes
SUBNET=$subnet
NET=$net
BRIDGE=$bridge
PREFIX=$PREFIX
EOF
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$net.254 cn-$PREFIX-head"
        for k in $(seq "$nodes"); do echo "$net.$k $(ns_name "$k")"; done
    } >"$STATE/hosts"
    # mpirun's plm_rsh_agent takes one program: a launcher bound to this cluster.
    cat >"$STATE/rsh" <<EOF
#!/bin/sh
exec env CLUSTER_PREFIX='$PREFIX' CLUSTER_STATE='$STATE' '$SELF' rsh "\$@"
EOF
    chmod +x "$STATE/rsh"

    run ip link add "$bridge" type bridge
    run ip addr add "$net.254/24" dev "$bridge"
    run ip link set "$bridge" up
    flock -u 9
    local k ns veth
    for k in $(seq "$nodes"); do
        ns="$(ns_name "$k")"
        veth="cn$PREFIX$k"
        [ ! -e "/run/netns/$ns" ] || die "namespace $ns already exists (another run with CLUSTER_PREFIX=$PREFIX?)"
        run ip netns add "$ns"
        run ip link add "$veth" type veth peer name eth0 netns "$ns"
        run ip link set "$veth" master "$bridge"
        run ip link set "$veth" up
        run ip -n "$ns" link set lo up
        run ip -n "$ns" addr add "$net.$k/24" dev eth0
        run ip -n "$ns" link set eth0 up
    done
    # Every node's link is up (carrier through the bridge).
    for k in $(seq "$nodes"); do
        ip -n "$(ns_name "$k")" -br link show eth0 | grep -q LOWER_UP \
            || sleep 0.2
    done
    trap - EXIT
    echo "cluster.sh: $nodes nodes up: $(ns_name 1)..$(ns_name "$nodes") on $net.0/24, bridge $bridge ($net.254), state $STATE"
}

# exec NODE cmd...: enter the node's network namespace, give the process its
# own UTS (hostname = namespace name) and mount namespace (/etc/hosts = the
# cluster's hosts file). nsenter, not `ip netns exec`: the latter remounts
# /sys, which slurmd's cgroup code does not survive. PID is preserved (all
# exec), so a caller can kill the command by the PID it started.
cmd_exec() {
    load_state
    [ $# -ge 2 ] || die "usage: exec NODE cmd..."
    local ns
    ns="$(node_ns "$1")"
    shift
    exec nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
        'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' \
        "$STATE/hosts" "$ns" "$@"
}

cmd_rsh() {
    load_state
    [ $# -ge 2 ] || die "usage: rsh NODE 'command string'"
    local ns
    ns="$(node_ns "$1")"
    shift
    exec nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
        'mount --bind "$0" /etc/hosts && hostname "$1" && shift && eval "$*"' \
        "$STATE/hosts" "$ns" "$@"
}

cmd_nft_loss() {
    load_state
    local pct="${1:-}"
    [[ "$pct" =~ ^[0-9]+$ ]] && [ "$pct" -le 100 ] || die "usage: nft-loss PCT (0..100)"
    command -v nft >/dev/null || die "nft missing (apt-get install nftables)"
    local k ns
    for k in $(seq "$NODES"); do
        ns="$(ns_name "$k")"
        ip netns exec "$ns" nft delete table inet cellnet_loss 2>/dev/null || true
        [ "$pct" -eq 0 ] && continue
        # Only traffic that crossed the bridge: loopback (and so node-local
        # discovery and ipc) is left alone.
        run ip netns exec "$ns" nft -f - <<EOF
table inet cellnet_loss {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "eth0" meta l4proto { udp, tcp } numgen random mod 100 < $pct counter drop
    }
}
EOF
    done
}

cmd_info() {
    load_state
    echo "NODES=$NODES"
    echo "NET=$NET"
    echo "SUBNET=$SUBNET"
    echo "BRIDGE=$BRIDGE"
    echo "HEAD=$NET.254"
    echo "STATE=$STATE"
    echo "HOSTS=$STATE/hosts"
    echo "RSH=$STATE/rsh"
    echo -n "NAMES="
    for k in $(seq "$NODES"); do echo -n "$(ns_name "$k") "; done
    echo
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down ;;
    exec) shift; cmd_exec "$@" ;;
    rsh) shift; cmd_rsh "$@" ;;
    nft-loss) shift; cmd_nft_loss "$@" ;;
    info) shift; cmd_info ;;
    *) die "usage: $0 up K | down | exec NODE cmd... | rsh NODE cmdstring | nft-loss PCT | info" ;;
esac

#!/usr/bin/env bash
# Creates a Redis Cluster (masters only) from the nodes in REDIS_CLUSTER_NODES
# ("host:port host:port host:port"), then waits until every node reports
# cluster_state:ok. Idempotent: a cluster that is already up is left alone.
#
# Used by the `redis-cluster-init` service of docker-compose.yml (profile
# `cluster`) and tested against local redis-servers by deploy/validate.sh.
# `CLUSTER MEET` needs IP addresses, so hostnames are resolved first.
# A password, if any, goes in REDISCLI_AUTH (read by redis-cli itself).
set -euo pipefail

read -r -a nodes <<<"${REDIS_CLUSTER_NODES:?set REDIS_CLUSTER_NODES to \"host:port host:port ...\"}"
timeout_s="${REDIS_CLUSTER_TIMEOUT:-60}"

resolve() { # host -> IPv4 address (an address is returned as is)
    local host="$1" ip
    if [[ "$host" =~ ^[0-9.]+$ ]]; then echo "$host"; return; fi
    for _ in $(seq "$timeout_s"); do
        ip="$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')"
        if [[ -n "$ip" ]]; then echo "$ip"; return; fi
        sleep 1
    done
    echo "cluster-init: cannot resolve $host" >&2
    return 1
}

wait_ping() { # ip port
    for _ in $(seq "$timeout_s"); do
        if [[ "$(redis-cli -h "$1" -p "$2" ping 2>/dev/null)" == PONG ]]; then return 0; fi
        sleep 1
    done
    echo "cluster-init: $1:$2 does not answer PING" >&2
    return 1
}

state() { # ip port -> cluster_state value
    redis-cli -h "$1" -p "$2" cluster info 2>/dev/null | tr -d '\r' | awk -F: '$1 == "cluster_state" { print $2 }'
}

addrs=()
for node in "${nodes[@]}"; do
    host="${node%:*}" port="${node##*:}"
    ip="$(resolve "$host")"
    wait_ping "$ip" "$port"
    addrs+=("$ip:$port")
done

first_ip="${addrs[0]%:*}" first_port="${addrs[0]##*:}"
known="$(redis-cli -h "$first_ip" -p "$first_port" cluster info | tr -d '\r' | awk -F: '$1 == "cluster_known_nodes" { print $2 }')"
if [[ "$(state "$first_ip" "$first_port")" == ok && "${known:-0}" -ge "${#addrs[@]}" ]]; then
    echo "cluster-init: cluster already formed (${known} nodes)"
else
    echo "cluster-init: creating a cluster of ${addrs[*]}"
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes
fi

for addr in "${addrs[@]}"; do
    ip="${addr%:*}" port="${addr##*:}"
    for i in $(seq "$timeout_s"); do
        [[ "$(state "$ip" "$port")" == ok ]] && break
        if [[ "$i" == "$timeout_s" ]]; then
            echo "cluster-init: $addr never reached cluster_state:ok" >&2
            exit 1
        fi
        sleep 1
    done
done
echo "cluster-init: cluster_state:ok on ${#addrs[@]} nodes"

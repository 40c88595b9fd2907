#!/usr/bin/env bash
# Agent footprint: runs the release agent against a real Mosquitto with every telemetry metric
# sampled and published every second (threshold 0) for DURATION seconds (default 60), and prints
# peak and steady resident memory and CPU seconds. The same run measures mosquitto_sub (a small
# C MQTT client) subscribed to the agent's topics as a reference, and prints the ratios, plus the
# ratio to the 5 MiB goal.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}
command -v mosquitto_sub >/dev/null || { echo "needs mosquitto and mosquitto-clients (apt-get install mosquitto mosquitto-clients)" >&2; exit 1; }
scripts/build-device.sh debfleet-agent debfleet-agent
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/m.conf"
/usr/sbin/mosquitto -c "$work/m.conf" 2>/dev/null &
mq=$!
sleep 0.3
cat > "$work/agent.toml" <<TOML
device_id = "bench-1"
broker = "mqtt://127.0.0.1:$port"
state_dir = "$work/state"
components_socket = "$work/agent.sock"
[telemetry.cpu]
interval_s = 1
threshold = 0
[telemetry.memory]
interval_s = 1
threshold = 0
[telemetry.disk]
interval_s = 1
threshold = 0
[logs]
batch_s = 1
TOML
target/agent/debfleet-agent --config "$work/agent.toml" 2>/dev/null &
agent=$!
mosquitto_sub -p "$port" -t 'debfleet/#' >"$work/sub.out" &
sub=$!
trap 'kill $agent $sub $mq 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; }
rss=()
for ((i = 0; i < DURATION; i++)); do
    sleep 1
    rss+=("$(kb $agent VmRSS)")
done
messages=$(grep -c . "$work/sub.out" || true)
half=$((DURATION / 2))
steady=$(printf '%s\n' "${rss[@]:$half}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
hwm=$(kb $agent VmHWM)
ref_rss=$(kb $sub VmRSS)
ref_hwm=$(kb $sub VmHWM)
agent_cpu=$(cpu_s $agent)
echo "agent footprint over ${DURATION}s, telemetry every second ($messages messages seen by the subscriber)"
printf '%-28s %10s %10s %8s\n' "" "VmHWM KiB" "VmRSS KiB" "CPU s"
printf '%-28s %10s %10s %8s\n' "debfleet-agent (agent profile)" "$hwm" "$steady" "$agent_cpu"
printf '%-28s %10s %10s %8s\n' "mosquitto_sub (reference)" "$ref_hwm" "$ref_rss" "$(cpu_s $sub)"
awk -v h="$hwm" -v s="$steady" -v rh="$ref_hwm" -v rs="$ref_rss" 'BEGIN {
    printf "agent / mosquitto_sub: peak %.2fx, steady %.2fx\n", h/rh, s/rs;
    printf "agent / 5 MiB goal:    peak %.2fx, steady %.2fx\n", h/5120, s/5120 }'

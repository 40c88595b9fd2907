#!/usr/bin/env bash
# Component overhead on a device, with the binaries users get (the `agent` profile):
#  - the LED-strip component running `rainbow-cycle` on a 1,000-LED virtual strip at 60 frames a
#    second: its peak and steady resident memory and its CPU share over DURATION seconds
#    (default 30), against the goals (3 MiB, 5 % of one core);
#  - the agent's resident memory with no component, then with COMPONENTS more connected
#    (default 16: the LED strip plus small clients that say hello and publish a state), the
#    added memory per component against the goal (64 KiB).
# Needs mosquitto; builds what it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
COMPONENTS=${COMPONENTS:-16}
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || { echo "needs mosquitto" >&2; exit 1; }
scripts/build-device.sh debfleet-agent debfleet-agent
scripts/build-device.sh debfleet-led-strip debfleet-led-strip
cargo build --release -p debfleet-console
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/m.conf"
/usr/sbin/mosquitto -c "$work/m.conf" 2>/dev/null &
mq=$!
sleep 0.3
cat > "$work/agent.toml" <<TOML
device_id = "bench-c"
broker = "mqtt://127.0.0.1:$port"
state_dir = "$work/state"
components_socket = "$work/agent.sock"
TOML
target/agent/debfleet-agent --config "$work/agent.toml" 2>/dev/null &
agent=$!
pids=("$agent" "$mq")
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
median_rss() { # PID SECONDS
    local v=()
    for ((i = 0; i < $2; i++)); do sleep 1; v+=("$(kb "$1" VmRSS)"); done
    printf '%s\n' "${v[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
sleep 3
agent_alone=$(median_rss "$agent" 5)

# The strip: 1,000 LEDs at 60 frames a second (its kept configuration), then rainbow-cycle.
mkdir -p "$work/led/state" "$work/led/run"
echo '{"leds": 1000, "fps": 60}' > "$work/led/state/cfg.json"
DEBFLEET_SOCKET="$work/agent.sock" STATE_DIRECTORY="$work/led/state" RUNTIME_DIRECTORY="$work/led/run" \
    target/agent/debfleet-led-strip 2>/dev/null &
led=$!
pids+=("$led")
sleep 2
DEBFLEET_BROKER="mqtt://127.0.0.1:$port" target/release/debfleet component call bench-c led-strip rainbow-cycle wait_ms=16 >/dev/null
sleep 2
t0=$(ticks "$led")
s0=$(date +%s.%N)
led_rss=$(median_rss "$led" "$DURATION")
t1=$(ticks "$led")
s1=$(date +%s.%N)
led_hwm=$(kb "$led" VmHWM)
fps=$(DEBFLEET_BROKER="mqtt://127.0.0.1:$port" target/release/debfleet component call bench-c led-strip frames --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]["result"]; print(r["shown"])')
cpu=$(awk -v t0="$t0" -v t1="$t1" -v s0="$s0" -v s1="$s1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", 100*(t1-t0)/hz/(s1-s0)}')

# More components: small clients on the agent's socket (hello, a state), held open.
python3 - "$work/agent.sock" "$((COMPONENTS - 1))" "$work/clients.ready" <<'PY' &
import json, socket, struct, sys, time
path, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def frame(obj):
    b = json.dumps(obj).encode()
    return struct.pack(">I", len(b)) + b
socks = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    meta = {"v": 1, "component": f"bench-{i}", "version": "1.0",
            "actions": [{"name": "clear"}, {"name": "cfg"}, {"name": "state"}]}
    s.sendall(frame({"hello": {"meta": meta}}))
    s.sendall(frame({"status": {"status": {"v": 1, "state": "running", "since": "2026-01-01T00:00:00.000Z"}}}))
    s.sendall(frame({"state": {"state": {"mode": "idle", "n": i}}}))
    socks.append(s)
open(ready, "w").close()
time.sleep(3600)
PY
pids+=($!)
for _ in $(seq 100); do [ -e "$work/clients.ready" ] && break; sleep 0.1; done
sleep 3
agent_with=$(median_rss "$agent" 5)
per=$(( (agent_with - agent_alone) / COMPONENTS ))

echo "component overhead: LED strip, rainbow-cycle, 1,000 LEDs, 60 frames/s, ${DURATION}s ($fps frames shown)"
printf '%-44s %10s %10s %8s\n' "" "VmHWM KiB" "VmRSS KiB" "CPU %"
printf '%-44s %10s %10s %8s\n' "debfleet-led-strip (agent profile)" "$led_hwm" "$led_rss" "$cpu"
printf '%-44s %10s\n' "debfleet-agent, no component (VmRSS KiB)" "$agent_alone"
printf '%-44s %10s\n' "debfleet-agent, $COMPONENTS components (VmRSS KiB)" "$agent_with"
printf '%-44s %10s\n' "added per connected component (KiB)" "$per"
awk -v h="$led_hwm" -v c="$cpu" -v p="$per" 'BEGIN {
    printf "LED strip / 3 MiB goal:          peak %.2fx\n", h/3072;
    printf "LED strip CPU / 5%% goal:         %.2fx\n", c/5;
    printf "agent per component / 64 KiB:    %.2fx\n", p/64 }'

#!/usr/bin/env bash
# BACnet/SC hub performance (issue 4, item 9): hub and load generator in one
# run on this machine, loopback, 20-byte NPDUs, release build. NOT run by CI.
#
#   ci/bench-bsc.sh                # every figure of the README table
#   ci/bench-bsc.sh fanout latency # only some groups
#
# Groups: fanout (broadcast, 100 and 1,000 receivers, window 32), unicast
# (100 nodes in 50 pairs, window 32), latency (1,000 receivers, window 1),
# hold (10,000 held connections, hub RSS), flood (a sender far faster than its
# receivers: every lost frame must show in the hub's counters).
# The rusty-bacnet hub (PyPI, TLS only, the fastest open hub we know) runs the
# same `hilbench load bsc` commands where it can (it refuses connections past
# 256), when $PYTHON has rusty_bacnet (ci/test.sh makes target/venv).
#
# Environment: HILBENCH (binary; default target/release/hilbench, built when
# missing), PYTHON (default target/venv/bin/python), DURATION (send phase per
# run, default 10s, at most 20s), OUT (JSON summaries and hub logs; default
# target/bench-bsc). Every run is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
secs=${DURATION%s}
if ! [[ "$secs" =~ ^[0-9]+$ ]] || ((secs < 1 || secs > 20)); then
  echo "DURATION must be 1s..20s (got $DURATION)" >&2
  exit 2
fi
OUT=${OUT:-target/bench-bsc}
PYTHON=${PYTHON:-target/venv/bin/python}
HILBENCH=${HILBENCH:-${CARGO_TARGET_DIR:-target}/release/hilbench}
if [ ! -x "$HILBENCH" ]; then
  cargo build --release --bins
fi
mkdir -p "$OUT"
# 10,000 held connections need that many descriptors in the generator and the
# hub (the hub also raises its own soft limit to the hard one).
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < 10100)); then
  echo "warning: ulimit -n is $(ulimit -n); the hold group needs 10,100 (raise the hard limit)" >&2
fi
PKI="$OUT/pki"
[ -f "$PKI/ca.pem" ] || "$HILBENCH" pki --out "$PKI" --nodes 4 >/dev/null
have_rusty=0
if [ -x "$PYTHON" ] && "$PYTHON" -c 'import rusty_bacnet' 2>/dev/null; then have_rusty=1; fi

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(fanout unicast latency hold flood)
want() { local g; for g in "${groups[@]}"; do [ "$g" = "$1" ] && return 0; done; return 1; }

HUB_PID=""
HUB_URL=""
stop_hub() {
  if [ -n "$HUB_PID" ]; then
    kill -TERM "$HUB_PID" 2>/dev/null || true
    wait "$HUB_PID" 2>/dev/null || true
    HUB_PID=""
  fi
}
trap stop_hub EXIT

# start_hub NAME ours-plain|ours-tls|rusty : sets HUB_PID and HUB_URL
start_hub() {
  local name=$1 kind=$2 ready="$OUT/$1.hub.out"
  : >"$ready"
  case $kind in
    ours-plain) "$HILBENCH" sim bsc-hub --listen 127.0.0.1:0 --plaintext --max-connections 12000 \
                  >"$ready" 2>"$OUT/$name.hub.err" & ;;
    ours-tls) "$HILBENCH" sim bsc-hub --listen 127.0.0.1:0 --tls-dir "$PKI" --max-connections 12000 \
                  >"$ready" 2>"$OUT/$name.hub.err" & ;;
    rusty) "$PYTHON" tests/py/bsc_peer.py hub --vmac 02:00:00:00:00:01 --pki "$PKI" \
                  --listen 127.0.0.1:0 --run-for 120 >"$ready" 2>"$OUT/$name.hub.err" & ;;
  esac
  HUB_PID=$!
  for _ in $(seq 100); do
    HUB_URL=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j = json.loads(l)
    if j.get("ready") or j.get("event") == "ready": print(j["url"]); break' "$ready" 2>/dev/null || true)
    [ -n "$HUB_URL" ] && return 0
    sleep 0.1
  done
  echo "hub $name did not start: $(cat "$OUT/$name.hub.err")" >&2
  return 1
}

# run NAME HUBKIND LOAD-ARGS... : one hub, one `load bsc` run, the hub's stats
run() {
  local name=$1 kind=$2
  shift 2
  local tls=()
  [ "$kind" = ours-plain ] || tls=(--tls-dir "$PKI")
  start_hub "$name" "$kind"
  local cmd=("$HILBENCH" load bsc --hub "$HUB_URL" "${tls[@]}" --hub-pid "$HUB_PID" --json "$@")
  echo "== $name: $(uptime | sed 's/.*load average/load average/')"
  echo "   ${cmd[*]}" | sed "s#$HUB_URL#URL#; s#$PKI#PKI#; s#--hub-pid $HUB_PID#--hub-pid HUBPID#"
  timeout 150 "${cmd[@]}" >"$OUT/$name.json" || true
  stop_hub
}

if want fanout; then
  for n in 100 1000; do
    run "fanout-$n-ws" ours-plain --nodes $((n + 1)) --senders 1 --window 32 --duration "$DURATION"
    run "fanout-$n-wss" ours-tls --nodes $((n + 1)) --senders 1 --window 32 --duration "$DURATION"
  done
  ((have_rusty)) && run "fanout-100-wss-rusty" rusty --nodes 101 --senders 1 --window 32 --duration "$DURATION"
fi
if want unicast; then
  run "unicast-100-ws" ours-plain --nodes 100 --senders 50 --unicast --window 32 --duration "$DURATION"
  run "unicast-100-wss" ours-tls --nodes 100 --senders 50 --unicast --window 32 --duration "$DURATION"
  ((have_rusty)) && run "unicast-100-wss-rusty" rusty --nodes 100 --senders 50 --unicast --window 32 --duration "$DURATION"
fi
if want latency; then
  run "latency-1000-ws" ours-plain --nodes 1001 --senders 1 --window 1 --duration "$DURATION"
  run "latency-1000-wss" ours-tls --nodes 1001 --senders 1 --window 1 --duration "$DURATION"
  run "latency-100-wss" ours-tls --nodes 101 --senders 1 --window 1 --duration "$DURATION"
  ((have_rusty)) && run "latency-100-wss-rusty" rusty --nodes 101 --senders 1 --window 1 --duration "$DURATION"
fi
if want hold; then
  run "hold-10000-ws" ours-plain --connect-only 10000 --hold 5s
  run "hold-10000-wss" ours-tls --connect-only 10000 --hold 5s
fi
if want flood; then
  # 10 M messages/s asked of one sender: the receivers fall behind and the hub
  # must either push back on the sender or count what it drops.
  run "flood-100-ws" ours-plain --nodes 101 --senders 1 --rate 10000000 --duration 5s
fi

python3 - "$OUT" "${groups[@]}" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
def hub_stats(name):
    try:
        for line in open(os.path.join(out, name + ".hub.err")):
            if line.startswith('{"stats"'):
                return json.loads(line)["stats"]
    except OSError:
        pass
    return None
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    try:
        s = json.load(open(path))
    except (OSError, ValueError):
        rows.append((name, "no summary (run failed)"))
        continue
    c, l = s["cpu"], s["latency_us"]
    st = hub_stats(name)
    drops = sum(st["drops"].values()) if st else None
    mem = s.get("hub_memory") or {}
    per_conn = mem.get("per_connection_bytes")
    cells = [
        f"{s['connected']}/{s['connect_failures']}",
        f"{s['deliveries_per_s']/1e3:.0f}k" if s["mode"] != "connect_only" else "-",
        f"{l['p50']/1e3:.2f}/{l['p99']/1e3:.2f}" if l["count"] else "-",
        f"{c['hub_us_per_delivery']:.2f}" if c.get("hub_us_per_delivery") is not None else "-",
        f"{c['generator_cores_used']:.2f}",
        f"{(c.get('hub_s') or 0)/max(s['duration_s'],1e-9):.2f}" if s["mode"] != "connect_only" else "-",
        f"{c['others_cores']:.2f}" if c.get("others_cores") is not None else "-",
        str(s["lost"]) if s.get("lost") is not None else "-",
        str(drops) if drops is not None else "-",
        f"{per_conn/1024:.1f}" if per_conn is not None else "-",
        "; ".join(w[:60] for w in s["warnings"]) or "",
    ]
    rows.append((name, cells))
hdr = ["run", "conn/fail", "deliv/s", "lat p50/p99 ms", "hub µs/deliv", "gen cores", "hub cores",
       "other cores", "lost", "hub drops", "hub kB/conn", "warnings"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for name, cells in rows:
    if isinstance(cells, str):
        print(f"| {name} | {cells} |")
    else:
        print("| " + " | ".join([name] + cells) + " |")
EOF

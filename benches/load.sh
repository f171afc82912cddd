#!/usr/bin/env bash
# Side-by-side load run: nginx (keep-alive reverse proxy setting an
# Authorization header) and tokenpool (static provider, 3 keys) in front of
# the same upstream, driven by wrk, with the load generator and the
# upstream pinned to one core and the proxy under test to the other.
#
# Installs nothing: it needs nginx (1.22 from Debian), wrk and taskset
# (util-linux) on PATH, and builds tokenpool in release mode. All traffic
# stays on 127.0.0.1; every run is bounded by DURATION and the script stops
# everything it started.
#
# Runs alternate between the two proxies ROUNDS times; the summary gives
# the median of each column, since a shared VM's runs vary by ±25%.
#
#   bash benches/load.sh            # 10 s per run, 3 rounds
#   DURATION=30s ROUNDS=5 bash benches/load.sh
#
# CALLGRIND=1 runs each proxy under valgrind's callgrind instead and
# prints the instructions each executes per request (the JSON POST, or
# the SSE stream with KIND=sse; 8 connections, DURATION each, start-up
# included; KEEP_CG=PREFIX keeps the profiles as PREFIX.nginx and
# PREFIX.tokenpool): the figure that repeats on a noisy VM. It needs
# valgrind (Debian: apt-get install valgrind).
#
#   CALLGRIND=1 DURATION=10s bash benches/load.sh
#   CALLGRIND=1 KIND=sse DURATION=10s bash benches/load.sh
#
# CLUSTER=1 compares tokenpool alone with tokenpool in cluster mode
# ([cluster] against a redis-server on the load core), 100 keys each
# (TOKENS), instead of nginx with tokenpool; it also counts the commands
# Redis served per proxied request (redis-cli info commandstats). It needs
# redis-server and redis-cli (Debian: apt-get install redis-server).
#
#   CLUSTER=1 DURATION=10s bash benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
KIND=${KIND:-json}
case "$KIND" in
  json) CG_PATH=/v1/chat ;;
  sse) CG_PATH=/v1/stream ;;
  *) echo "load.sh: KIND is json or sse, not $KIND" >&2; exit 1 ;;
esac
CALLGRIND=${CALLGRIND:-0}
CLUSTER=${CLUSTER:-0}
if [ "$CLUSTER" = 1 ]; then TOKENS=${TOKENS:-100}; else TOKENS=${TOKENS:-3}; fi
if [ "${ACCESS_LOG:-0}" = 1 ]; then ACCESS_LOG_ON=true; else ACCESS_LOG_ON=false; fi
LOAD_CORE=${LOAD_CORE:-0}
PROXY_CORE=${PROXY_CORE:-1}

for tool in nginx wrk taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "load.sh: $tool is not installed (Debian: apt-get install nginx wrk util-linux curl)" >&2; exit 1; }
done
if [ "$CLUSTER" = 1 ]; then
  for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null || { echo "load.sh: $tool is not installed (Debian: apt-get install redis-server)" >&2; exit 1; }
  done
fi
if [ "$CALLGRIND" = 1 ]; then
  command -v valgrind >/dev/null || { echo "load.sh: valgrind is not installed (Debian: apt-get install valgrind)" >&2; exit 1; }
  # Under valgrind each proxy is one process, and starts far slower.
  NGINX_SINGLE=(-g "master_process off;")
  STARTUP_TRIES=600
else
  NGINX_SINGLE=()
  STARTUP_TRIES=100
fi
cargo build --release --quiet
BIN=target/release/tokenpool

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_http() {
  for _ in $(seq "$STARTUP_TRIES"); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "load.sh: $1 never answered" >&2; exit 1
}

UP_PORT=$(free_port)
NGINX_PORT=$(free_port)
TP_PORT=$(free_port)
TP_ADMIN=$(free_port)
TPC_PORT=$(free_port)
TPC_ADMIN=$(free_port)
REDIS_PORT=$(free_port)

# The SSE answer: 20 events, as an SSE upstream sends them.
python3 - "$WORK/sse.txt" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(20):
        f.write(f"data: {'x' * 48}{i:02d}\n\n")
    f.write("data: [DONE]\n\n")
PY

# One nginx process is the upstream (on the load core), another the proxy
# under comparison (on the proxy core). Each has its own config and pid.
mkdir -p "$WORK/up" "$WORK/px"
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/up/nginx.pid;
error_log $WORK/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/up;
  server {
    listen 127.0.0.1:$UP_PORT reuseport;
    location /v1/chat { default_type application/json; return 200 '{"id":"r1","ok":true,"usage":{"tokens":12}}'; }
    location /v1/stream { default_type text/event-stream; return 200 '$(cat "$WORK/sse.txt")'; }
  }
}
EOF
cat >"$WORK/px/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/px/nginx.pid;
error_log $WORK/px/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/px;
  proxy_temp_path $WORK/px;
  upstream backend { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-load-key-1";
      proxy_buffering off;
    }
  }
}
EOF
# tokenpool: the static provider, TOKENS keys (the upstream takes any);
# with CLUSTER=1, SECTION adds [cluster].
tokenpool_config() {
  local port=$1 admin=$2 section=${3:-}
  cat <<EOF
[server]
listen = "127.0.0.1:$port"
api_keys = ["load-client-key"]
[admin]
listen = "127.0.0.1:$admin"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[refresh]
provider = "static"
[log]
# nginx runs with access_log off: compare like with like (ACCESS_LOG=1
# turns tokenpool's on).
access = ${ACCESS_LOG_ON:-false}
$section
EOF
  for i in $(seq "$TOKENS"); do
    printf '[[tokens]]\nname = "k%d"\ntier = "shared"\ntoken = "sk-load-key-%d"\n' "$i" "$i"
  done
}
tokenpool_config "$TP_PORT" "$TP_ADMIN" >"$WORK/tokenpool.toml"
if [ "$CLUSTER" = 1 ]; then
  taskset -c "$LOAD_CORE" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK" \
    --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  tokenpool_config "$TPC_PORT" "$TPC_ADMIN" "$(printf '[cluster]\nredis = "redis://127.0.0.1:%s/0"\nkey_prefix = "load"\nnode = "load"' "$REDIS_PORT")" \
    >"$WORK/tokenpool-cluster.toml"
fi

taskset -c "$LOAD_CORE" nginx -c "$WORK/up/nginx.conf" -p "$WORK/up" &
PIDS+=($!)
NGINX_UNDER=()
TP_UNDER=()
if [ "$CALLGRIND" = 1 ]; then
  NGINX_UNDER=(valgrind --quiet --tool=callgrind --callgrind-out-file="$WORK/nginx.cg")
  TP_UNDER=(valgrind --quiet --tool=callgrind --callgrind-out-file="$WORK/tokenpool.cg")
fi
taskset -c "$PROXY_CORE" ${NGINX_UNDER[@]+"${NGINX_UNDER[@]}"} \
  nginx ${NGINX_SINGLE[@]+"${NGINX_SINGLE[@]}"} -c "$WORK/px/nginx.conf" -p "$WORK/px" &
PIDS+=($!)
NGINX_PROXY_PID=$!
RUST_LOG=warn taskset -c "$PROXY_CORE" ${TP_UNDER[@]+"${TP_UNDER[@]}"} \
  "$BIN" serve -c "$WORK/tokenpool.toml" 2>"$WORK/tokenpool.log" &
PIDS+=($!)
TP_PID=$!
if [ "$CLUSTER" = 1 ]; then
  RUST_LOG=warn taskset -c "$PROXY_CORE" "$BIN" serve -c "$WORK/tokenpool-cluster.toml" \
    2>"$WORK/tokenpool-cluster.log" &
  PIDS+=($!)
  TPC_PID=$!
  wait_http "http://127.0.0.1:$TPC_ADMIN/healthz"
  for _ in $(seq 100); do
    curl -s "http://127.0.0.1:$TPC_ADMIN/metrics" | grep -q '^tokenpool_cluster_up 1' && break
    sleep 0.1
  done
fi
wait_http "http://127.0.0.1:$UP_PORT/v1/chat"
wait_http "http://127.0.0.1:$NGINX_PORT/v1/chat"
wait_http "http://127.0.0.1:$TP_ADMIN/healthz"
if [ "$CALLGRIND" = 1 ]; then
  NGINX_WORKER_PID=$NGINX_PROXY_PID
else
  # The nginx master forks its worker: measure the worker's CPU.
  sleep 0.3
  NGINX_WORKER_PID=$(pgrep -P "$NGINX_PROXY_PID" | head -1)
fi

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# The two requests: a small JSON POST, like a chat completion request, and
# a GET of the 20-event SSE answer.
printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer load-client-key"\n' \
  "'{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'" >"$WORK/json.lua"
printf 'wrk.method = "GET"\nwrk.headers["Accept"] = "text/event-stream"\nwrk.headers["Authorization"] = "Bearer load-client-key"\n' >"$WORK/sse.lua"

# run NAME KIND PID URL CONNECTIONS -> prints one table row
run() {
  local name=$1 kind=$2 pid=$3 url=$4 conns=$5
  local lua="$WORK/$kind.lua"
  # Warm up keep-alive pools, then measure.
  taskset -c "$LOAD_CORE" wrk -t1 -c"$conns" -d2s -s "$lua" "$url" >/dev/null 2>&1 || true
  local u1 s1 u2 s2 out
  read -r u1 s1 < <(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$lua" "$url")
  read -r u2 s2 < <(cpu_ticks "$pid")
  python3 - "$name" "$kind" "$conns" "$((u2 - u1))" "$((s2 - s1))" "$CLK_TCK" "$out" <<'PY'
import re, sys
name, kind, conns, user, system, clk, out = sys.argv[1:8]
if "requests in" not in out:
    sys.exit(f"wrk gave no result for {name} {kind} {conns}:\n{out}")
def dur(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    if not m:
        sys.exit(f"wrk printed a latency load.sh cannot read ({s!r}) for {name} {kind} {conns}:\n{out}")
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[u]
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
# The "Latency Distribution" lines; "74.50%" in the stats line is not one.
p50 = dur(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = dur(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
per_req = lambda ticks: int(ticks) / int(clk) * 1e6 / max(reqs, 1)
user_us, sys_us = per_req(user), per_req(system)
print(f"{name:<10} {kind:<5} {conns:>4} {rps:>10.0f} {p50:>9.0f} {p99:>9.0f} {user_us + sys_us:>10.1f} {user_us:>8.1f} {sys_us:>8.1f}  {errors.group(1) + ' non-2xx' if errors else ''}")
PY
}

if [ "$CALLGRIND" = 1 ]; then
  # count NAME PID URL FILE SIGNAL -> one row: requests, instructions, per request
  count() {
    local name=$1 pid=$2 url=$3 file=$4 signal=$5 lua="$WORK/$KIND.lua" out requests total
    out=$(taskset -c "$LOAD_CORE" wrk -t1 -c8 -d"$DURATION" -s "$lua" "$url")
    requests=$(grep -oE '[0-9]+ requests in' <<<"$out" | grep -oE '^[0-9]+')
    # callgrind writes its counts when the program exits.
    kill "-$signal" "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    # (awk reads to the end: a reader that stops early fails the pipe.)
    [ -z "${KEEP_CG:-}" ] || cp "$file" "$KEEP_CG.$name"
    total=$(callgrind_annotate "$file" | awk '/PROGRAM TOTALS/ && !seen { seen = 1; gsub(",", "", $1); print $1 }')
    printf '%-10s %10s %16s %10s\n' "$name" "$requests" "$total" "$((total / requests))"
  }
  echo "# load.sh under callgrind: $KIND, 8 connections, $DURATION per proxy, start-up included (about 0.1k per request at 5 s)"
  printf '%-10s %10s %16s %10s\n' proxy requests instructions "per req"
  count nginx "$NGINX_WORKER_PID" "http://127.0.0.1:$NGINX_PORT$CG_PATH" "$WORK/nginx.cg" QUIT
  count tokenpool "$TP_PID" "http://127.0.0.1:$TP_PORT$CG_PATH" "$WORK/tokenpool.cg" TERM
  exit 0
fi

echo "# load.sh: $(nproc) cores, wrk + upstream on core $LOAD_CORE, proxy on core $PROXY_CORE, $DURATION per run, $ROUNDS rounds, $TOKENS keys"
printf '%-10s %-5s %4s %10s %9s %9s %10s %8s %8s\n' proxy kind conn "req/s" "p50 µs" "p99 µs" "CPU µs/req" "user" "sys"
if [ "$CLUSTER" = 1 ]; then
  A=(tokenpool "$TP_PID" "$TP_PORT")
  B=(tp-cluster "$TPC_PID" "$TPC_PORT")
  redis_calls() { redis-cli -p "$REDIS_PORT" info commandstats | grep -oE 'calls=[0-9]+' | cut -d= -f2 | awk '{ s += $1 } END { printf "%d", s }'; }
  served() { curl -s "http://127.0.0.1:$TPC_ADMIN/metrics" | awk '/^tokenpool_requests_total/ { s += $2 } END { printf "%d", s }'; }
  CALLS_BEFORE=$(redis_calls)
  SERVED_BEFORE=$(served)
else
  A=(nginx "$NGINX_WORKER_PID" "$NGINX_PORT")
  B=(tokenpool "$TP_PID" "$TP_PORT")
fi
for round in $(seq "$ROUNDS"); do
  for conns in 64 1; do
    run "${A[0]}" json "${A[1]}" "http://127.0.0.1:${A[2]}/v1/chat" "$conns" | tee -a "$WORK/rows"
    run "${B[0]}" json "${B[1]}" "http://127.0.0.1:${B[2]}/v1/chat" "$conns" | tee -a "$WORK/rows"
  done
  run "${A[0]}" sse "${A[1]}" "http://127.0.0.1:${A[2]}/v1/stream" 64 | tee -a "$WORK/rows"
  run "${B[0]}" sse "${B[1]}" "http://127.0.0.1:${B[2]}/v1/stream" 64 | tee -a "$WORK/rows"
done
if [ "$CLUSTER" = 1 ]; then
  # (The commandstats call itself is counted too: one per reading.)
  CALLS=$(( $(redis_calls) - CALLS_BEFORE ))
  SERVED=$(( $(served) - SERVED_BEFORE ))
  python3 -c "import sys; c, s = int(sys.argv[1]), int(sys.argv[2]); print(f'\nRedis: {c} commands while tp-cluster served {s} requests (warm-ups included): {c / max(s, 1):.6f} per request')" "$CALLS" "$SERVED"
fi

python3 - "$WORK/rows" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r[0], r[1], r[2]), []).append([float(x) for x in r[3:9]])
med = {k: [statistics.median(col) for col in zip(*v)] for k, v in by.items()}
print("\nmedians of the rounds")
print(f"{'proxy':<10} {'kind':<5} {'conn':>4} {'req/s':>10} {'p50 µs':>9} {'p99 µs':>9} {'CPU µs/req':>10} {'user':>8} {'sys':>8}")
for (name, kind, conns), m in sorted(med.items(), key=lambda kv: (kv[0][1], -int(kv[0][2]), kv[0][0])):
    print(f"{name:<10} {kind:<5} {conns:>4} {m[0]:>10.0f} {m[1]:>9.0f} {m[2]:>9.0f} {m[3]:>10.1f} {m[4]:>8.1f} {m[5]:>8.1f}")
names = sorted({k[0] for k in med})
base, other = ("tokenpool", "tp-cluster") if "tp-cluster" in names else ("nginx", "tokenpool")
print(f"\nratio {other} / {base}, medians (req/s higher is better; p99 and CPU lower is better)")
for (kind, conns) in [("json", "64"), ("json", "1"), ("sse", "64")]:
    n, t = med.get((base, kind, conns)), med.get((other, kind, conns))
    if n and t:
        print(f"  {kind:<5} {conns:>3} conns: req/s x{t[0] / n[0]:.2f}   p99 x{t[2] / max(n[2], 1):.2f}   CPU/req x{t[3] / max(n[3], 0.001):.2f} (user x{t[4] / max(n[4], 0.001):.2f}, sys x{t[5] / max(n[5], 0.001):.2f})")
PY

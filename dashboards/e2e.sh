#!/usr/bin/env bash
# End-to-end check of the monitoring: a live tokenpool (the demo, whose
# simulated upstream has a revoked and an out-of-quota token, in cluster
# mode against a redis-server started here), a real
# Prometheus scraping it every second with the repo's alert rules, a real
# Alertmanager delivering to a webhook receiver run here, and every query
# of the Grafana dashboard run against that Prometheus.
#
# Needs: prometheus, prometheus-alertmanager, promtool, redis-server (Debian
# packages of those names), python3, curl, and a built target/debug/tokenpool.
# Everything listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in prometheus prometheus-alertmanager promtool redis-server python3 curl; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is not installed" >&2; exit 1; }
done
BIN=target/debug/tokenpool
[ -x "$BIN" ] || cargo build --quiet

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "e2e: FAILED: $*" >&2
  for log in "$WORK"/*.log; do echo "--- $log"; tail -n 20 "$log"; done >&2
  exit 1
}

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local deadline=$((SECONDS + $2))
  until eval "$1" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

echo "== redis-server"
REDIS_PORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK" --save "" --appendonly no \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_for "grep -q 'Ready to accept connections' '$WORK/redis.log'" 30 || fail "redis-server did not start"

echo "== tokenpool demo (in cluster mode)"
"$BIN" demo --redis "redis://127.0.0.1:$REDIS_PORT/0" >"$WORK/demo.out" 2>"$WORK/demo.log" &
PIDS+=($!)
wait_for "grep -q 'Ctrl-C' '$WORK/demo.out'" 30 || fail "demo did not start"
PROXY=$(grep -o 'http://127.0.0.1:[0-9]*/ai/multi-agent' "$WORK/demo.out" | head -1 | sed 's|/ai/multi-agent||')
ADMIN=$(grep -o 'http://127.0.0.1:[0-9]*/admin/pool' "$WORK/demo.out" | head -1 | sed 's|/admin/pool||')
ADMIN_HOSTPORT=${ADMIN#http://}
echo "proxy $PROXY, admin $ADMIN"

# Traffic for the whole run: bob's quota 429s fail over to alice.
(
  end=$((SECONDS + 120))
  while [ $SECONDS -lt $end ]; do
    curl -s -o /dev/null -X POST "$PROXY/ai/multi-agent" --data-binary x || true
    sleep 0.1
  done
) &
PIDS+=($!)
sleep 1

echo "== promtool check metrics (live scrape)"
curl -sf "$ADMIN/metrics" >"$WORK/scrape.txt" || fail "cannot scrape $ADMIN/metrics"
promtool check metrics <"$WORK/scrape.txt" || fail "promtool check metrics"
wait_for "curl -sf '$ADMIN/metrics' | grep -q '^tokenpool_cluster_up 1'" 30 || fail "the demo did not join the cluster"

echo "== promtool check rules / test rules"
promtool check rules dashboards/alerts.yml || fail "promtool check rules"
promtool test rules dashboards/alerts_test.yml || fail "promtool test rules"

echo "== webhook receiver"
HOOK_PORT=$(free_port)
cat >"$WORK/hook.py" <<'PY'
import http.server, sys
out = sys.argv[2]
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(out, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
PY
python3 "$WORK/hook.py" "$HOOK_PORT" "$WORK/alerts.jsonl" >"$WORK/hook.log" 2>&1 &
PIDS+=($!)

echo "== alertmanager"
AM_PORT=$(free_port)
cat >"$WORK/alertmanager.yml" <<EOF
route:
  receiver: hook
  group_by: [alertname, token]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: http://127.0.0.1:$HOOK_PORT/
EOF
prometheus-alertmanager --config.file="$WORK/alertmanager.yml" \
  --storage.path="$WORK/am-data" \
  --web.listen-address="127.0.0.1:$AM_PORT" \
  --cluster.listen-address= >"$WORK/alertmanager.log" 2>&1 &
PIDS+=($!)
wait_for "curl -sf http://127.0.0.1:$AM_PORT/-/ready" 30 || fail "alertmanager did not start"

echo "== prometheus"
PROM_PORT=$(free_port)
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $(pwd)/dashboards/alerts.yml
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:$AM_PORT"]
scrape_configs:
  - job_name: tokenpool
    static_configs:
      - targets: ["$ADMIN_HOSTPORT"]
EOF
prometheus --config.file="$WORK/prometheus.yml" \
  --storage.tsdb.path="$WORK/prom-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
wait_for "curl -sf $PROM/-/ready" 60 || fail "prometheus did not start"

echo "== the revoked token's alert reaches the webhook through Alertmanager"
wait_for "grep -q TokenpoolTokenRevoked '$WORK/alerts.jsonl'" 90 || fail "no TokenpoolTokenRevoked delivered"
python3 - "$WORK/alerts.jsonl" <<'PY' || fail "webhook payload"
import json, sys
for line in open(sys.argv[1]):
    msg = json.loads(line)
    for alert in msg["alerts"]:
        if alert["labels"]["alertname"] == "TokenpoolTokenRevoked":
            assert alert["status"] == "firing", alert
            assert alert["labels"]["token"] == "carol", alert
            assert alert["labels"]["severity"] == "warning", alert
            assert "runbook_url" in alert["annotations"], alert
            print("delivered:", alert["labels"]["alertname"], alert["labels"]["token"], alert["annotations"]["summary"])
            sys.exit(0)
sys.exit("TokenpoolTokenRevoked not in the payloads")
PY

echo "== every dashboard query runs on Prometheus"
sleep 5
python3 - "$PROM" dashboards/tokenpool.json <<'PY' || fail "dashboard queries"
import json, sys, urllib.parse, urllib.request
prom, path = sys.argv[1], sys.argv[2]
dash = json.load(open(path))
subst = {"$__rate_interval": "30s", "$__range": "5m", "$job": "tokenpool",
         "$instance": ".*", "$tier": ".*", "$token": ".*"}
queries = []
for panel in dash["panels"]:
    for t in panel.get("targets", []):
        queries.append((panel["title"], t["expr"]))
for var in dash["templating"]["list"]:
    q = var.get("query")
    if isinstance(q, dict) and q["query"].startswith("label_values("):
        # label_values(metric, label) -> count by (label) (metric)
        inner = q["query"][len("label_values("):-1]
        metric, label = inner.rsplit(",", 1)
        queries.append((f"variable {var['name']}", f"count by ({label.strip()}) ({metric.strip()})"))
errors, empty = [], []
for title, expr in queries:
    for k, v in subst.items():
        expr = expr.replace(k, v)
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.load(urllib.request.urlopen(url, timeout=10))
    except Exception as e:
        errors.append((title, expr, str(e)))
        continue
    if body.get("status") != "success":
        errors.append((title, expr, body.get("error")))
    elif not body["data"]["result"]:
        empty.append((title, expr))
print(f"{len(queries)} queries: {len(errors)} errors, {len(queries) - len(errors) - len(empty)} with data, {len(empty)} empty")
for title, expr in empty:
    print("  no data:", title, "::", expr)
for e in errors:
    print("  ERROR:", *e)
if errors:
    sys.exit(1)
if len(empty) * 5 > len(queries):
    sys.exit("more than a fifth of the dashboard's queries returned no data")
PY

echo "e2e: 1 passed, 0 failed"

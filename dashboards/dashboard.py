#!/usr/bin/env python3
"""Writes dashboards/tokenpool.json, the Grafana dashboard for tokenpool.

Run it after changing a panel: python3 dashboards/dashboard.py
The e2e check (dashboards/e2e.sh) runs every query against a real
Prometheus scraping a live proxy.
"""
import json
import os

SEL = 'job=~"$job", instance=~"$instance"'
SEL_TIER = SEL + ', tier=~"$tier"'
SEL_TOKEN = SEL_TIER + ', token=~"$token"'
DS = {"type": "prometheus", "uid": "${datasource}"}

panels = []
_next_id = [1]
_y = [0]


def _id():
    i = _next_id[0]
    _next_id[0] += 1
    return i


def row(title):
    panels.append({"type": "row", "title": title, "id": _id(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


_x = [0]


def panel(kind, title, description, targets, unit, w=8, h=8, stack=False, extra=None):
    if _x[0] + w > 24:
        _x[0] = 0
        _y[0] += h
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "id": _id(),
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": _x[0], "y": _y[0]},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        }
    if extra:
        for k, v in extra.items():
            p[k] = v
    panels.append(p)
    _x[0] += w
    if _x[0] >= 24:
        _x[0] = 0
        _y[0] += h


def end_row():
    if _x[0] != 0:
        _x[0] = 0
        _y[0] += 8


def quantiles(metric, by=""):
    by_clause = f"le{', ' + by if by else ''}"
    return [
        (f'histogram_quantile({q}, sum by ({by_clause}) (rate({metric}_bucket{{{SEL_TIER if by else SEL}}}[$__rate_interval])))',
         f"p{int(q * 100)}" + (" {{" + by + "}}" if by else ""))
        for q in (0.5, 0.9, 0.99)
    ]


row("Traffic")
panel("timeseries", "Requests by outcome",
      "Client requests per second by outcome: success (<400), client_error (4xx, 413), upstream_error (5xx, 502, 504), no_token (503), rejected (401 from the proxy).",
      [(f'sum by (outcome) (rate(tokenpool_requests_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")],
      "reqps", stack=True)
panel("timeseries", "Time to response headers",
      "Quantiles of the time from a client request to its response headers, failovers and refreshes included.",
      quantiles("tokenpool_request_duration_seconds"), "s")
panel("timeseries", "In-flight requests",
      "Requests being served, open streams included.",
      [(f'sum(tokenpool_inflight_requests{{{SEL}}})', "in flight")], "short")
end_row()

row("Pool")
panel("timeseries", "Tokens by state",
      "How many tokens are active, cooling down, disabled or revoked.",
      [(f'sum by (state) (tokenpool_tokens{{{SEL_TIER}}})', "{{state}}")], "short", stack=True)
panel("state-timeline", "Token up/down",
      "1 = in rotation; 0 = cooling down, disabled or revoked (see /admin/pool for why).",
      [(f'max by (token) (tokenpool_token_up{{{SEL_TOKEN}}})', "{{token}}")], "short",
      extra={"options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                         "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False}},
             "fieldConfig": {"defaults": {"unit": "short", "mappings": [
                 {"type": "value", "options": {"0": {"text": "down", "color": "red"},
                                               "1": {"text": "up", "color": "green"}}}]},
                 "overrides": []}})
panel("timeseries", "Selections per tier",
      "Tokens picked per second, by tier.",
      [(f'sum by (tier) (rate(tokenpool_selections_total{{{SEL_TIER}}}[$__rate_interval]))', "{{tier}}")], "ops", stack=True)
panel("timeseries", "Selections per token",
      "Tokens picked per second, by token: round-robin should spread them evenly inside a tier.",
      [(f'sum by (token) (rate(tokenpool_selections_total{{{SEL_TOKEN}}}[$__rate_interval]))', "{{token}}")], "ops")
panel("timeseries", "Tier fallbacks",
      "Requests served by a lower tier because every token of the first tier was unavailable.",
      [(f'sum by (from_tier, to_tier) (rate(tokenpool_tier_fallbacks_total{{{SEL}}}[$__rate_interval]))', "{{from_tier}} → {{to_tier}}")], "reqps")
panel("timeseries", "Failovers by reason",
      "Requests that moved to another token, by why they left the first.",
      [(f'sum by (reason) (rate(tokenpool_failovers_total{{{SEL_TIER}}}[$__rate_interval]))', "{{reason}}")], "reqps", stack=True)
panel("timeseries", "Token failures by reason",
      "Failures charged to tokens, by token and reason.",
      [(f'sum by (token, reason) (rate(tokenpool_token_failures_total{{{SEL_TOKEN}}}[$__rate_interval]))', "{{token}} {{reason}}")], "ops")
end_row()

row("Refresh")
panel("timeseries", "Refreshes by outcome",
      "Refresh calls per second: success, failed (rejected), revoked, unavailable (endpoint down, slow or broken), rate_limited.",
      [(f'sum by (outcome) (rate(tokenpool_refreshes_total{{{SEL_TIER}}}[$__rate_interval]))', "{{outcome}}")], "ops", stack=True)
panel("timeseries", "Refresh latency",
      "Quantiles of refresh call latency.",
      quantiles("tokenpool_refresh_duration_seconds"), "s")
panel("timeseries", "Access token time left",
      "Seconds until each token's access token expires; the refresher renews ahead of `[refresh] margin`.",
      [(f'max by (token) (tokenpool_token_access_expiry_timestamp_seconds{{{SEL_TOKEN}}}) - time()', "{{token}}")], "s")
end_row()

row("Upstream")
panel("timeseries", "Upstream status codes",
      "Upstream answers per second by HTTP status.",
      [(f'sum by (code) (rate(tokenpool_upstream_requests_total{{{SEL_TIER}}}[$__rate_interval]))', "{{code}}")], "reqps", stack=True)
panel("timeseries", "Upstream time to headers",
      "Quantiles of the time from sending a request upstream to its response headers.",
      quantiles("tokenpool_upstream_response_seconds"), "s")
panel("timeseries", "Upstream time to headers by tier",
      "p99 time to upstream headers per tier.",
      [(f'histogram_quantile(0.99, sum by (le, tier) (rate(tokenpool_upstream_response_seconds_bucket{{{SEL_TIER}}}[$__rate_interval])))', "p99 {{tier}}")], "s")
end_row()

row("Quota")
panel("timeseries", "Remaining quota by tier",
      "Requests left in the tokens' quotas, summed by tier, as the upstream last said (answer headers, or `[quota]` polls), less those answered since. Tokens whose quota is unknown or unlimited are not counted.",
      [(f'sum by (tier) (tokenpool_token_quota_remaining{{{SEL_TIER}}})', "{{tier}}")], "short", w=8)
panel("timeseries", "Time to exhaustion by tier",
      "Remaining quota of a tier divided by the rate its tokens are answered (2xx) over the last hour: when the tier runs dry at this pace.",
      [(f'sum by (tier) (tokenpool_token_quota_remaining{{{SEL_TIER}}}) / sum by (tier) (rate(tokenpool_upstream_requests_total{{{SEL_TIER}, code=~"2.."}}[1h]))', "{{tier}}")], "s", w=8)
panel("timeseries", "Remaining quota by token",
      "Requests left per token; a token at 0 rests until its quota refills.",
      [(f'max by (token) (tokenpool_token_quota_remaining{{{SEL_TOKEN}}})', "{{token}}")], "short", w=8)
panel("timeseries", "Quota polls and session affinity",
      "Polls of the quota endpoint by result; requests of sessions (`[pool] affinity_header`) by how they were placed: hit (on their token), moved (it was unavailable), none (no session header).",
      [(f'sum by (result) (rate(tokenpool_quota_polls_total{{{SEL}}}[$__rate_interval]))', "poll {{result}}"),
       (f'sum by (result) (rate(tokenpool_affinity_total{{{SEL}}}[$__rate_interval]))', "session {{result}}")], "ops", w=12)
end_row()

row("Cluster")
panel("stat", "Replicas sharing the pool",
      "Replicas connected to the cluster's Redis, out of those exporting `tokenpool_cluster_up` (only with `[cluster]`). A replica at 0 serves on its local state.",
      [(f'sum(tokenpool_cluster_up{{{SEL}}})', "connected"),
       (f'count(tokenpool_cluster_up{{{SEL}}})', "replicas")], "short", w=4,
      extra={"options": {"graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}})
panel("timeseries", "Connected to Redis",
      "1 while a replica shares the pool; 0 while it serves on local state and reconnects.",
      [(f'max by (instance) (tokenpool_cluster_up{{{SEL}}})', "{{instance}}")], "short", w=6)
panel("timeseries", "Exchanges with Redis",
      "Reads and writes of shared state per second, by result; errors mean Redis was away, slow or refused.",
      [(f'sum by (result) (rate(tokenpool_cluster_sync_total{{{SEL}}}[$__rate_interval]))', "{{result}}")], "ops", w=7, stack=True)
panel("timeseries", "Token changes shared",
      "Token changes (state, refresh token, access token) sent to and taken from other replicas, per second.",
      [(f'sum by (direction) (rate(tokenpool_cluster_events_total{{{SEL}}}[$__rate_interval]))', "{{direction}}")], "ops", w=7)
end_row()

row("Configuration and process")
panel("timeseries", "Config reloads",
      "Reloads by result; a failure keeps the previous configuration serving.",
      [(f'sum by (result) (increase(tokenpool_config_reloads_total{{{SEL}}}[$__rate_interval]))', "{{result}}")], "short")
panel("stat", "Last reload",
      "1 when the last reload succeeded; 0 means the file on disk is not what is running.",
      [(f'min(tokenpool_config_last_reload_successful{{{SEL}}})', "last reload ok")], "bool_yes_no", w=4,
      extra={"options": {"colorMode": "background", "graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}})
panel("stat", "Since last good load",
      "Time since the configuration was last loaded successfully.",
      [(f'time() - max(tokenpool_config_last_reload_success_timestamp_seconds{{{SEL}}})', "age")], "s", w=4,
      extra={"options": {"graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}})
panel("timeseries", "Process CPU and memory",
      "CPU seconds per second and resident memory of the tokenpool process.",
      [(f'sum(rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval]))', "CPU"),
       (f'sum(process_resident_memory_bytes{{{SEL}}}) / 1e6', "RSS MB"),
       (f'sum(process_open_fds{{{SEL}}})', "open fds")], "short")
end_row()


def var_query(name, label, query, include_all=True, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": include_all, "multi": multi, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"} if include_all else {}, "sort": 1}


dashboard = {
    "uid": "tokenpool-overview",
    "title": "tokenpool",
    "description": "Token pool proxy: traffic, tokens by tier and state, failovers, refreshes, upstream, reloads.",
    "tags": ["tokenpool"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "timezone": "browser",
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": ""},
        var_query("job", "Job", "label_values(tokenpool_build_info, job)"),
        var_query("instance", "Instance", 'label_values(tokenpool_build_info{job=~"$job"}, instance)'),
        {"name": "tier", "label": "Tier", "type": "custom", "query": "personal,shared,anonymous",
         "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"},
         "options": [{"text": t, "value": t, "selected": False} for t in ("personal", "shared", "anonymous")]},
        var_query("token", "Token", 'label_values(tokenpool_token_up{job=~"$job", instance=~"$instance", tier=~"$tier"}, token)'),
    ]},
    "panels": panels,
}

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "tokenpool.json"), "w") as f:
    json.dump(dashboard, f, indent=2, ensure_ascii=False)
    f.write("\n")
print(f"{len([p for p in panels if p['type'] != 'row'])} panels written to dashboards/tokenpool.json")

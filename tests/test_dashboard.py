"""The operators' dashboard (serve/ops/): a Grafana dashboard that imports, whose PromQL asks
only for metrics (and labels) that `qaserve serve --metrics-port` really exports, and the
Prometheus scrape config beside it.

The fast tests check the JSON's structure and the PromQL reading; the slow one starts the
server on tiny models, sends every kind of request the panels show, and checks each metric
name and label the dashboard queries against the live /metrics (Ray exports with a delay).
"""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from qaserve.loadtests.run import ServerProcess
from qaserve.runtime.server import CONFIG_DIR, free_port
from qaserve.stages import DEPLOYMENTS as STAGES

OPS = CONFIG_DIR.parent / "ops"  # the package's ops/ folder (serve/ops in the source tree)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}

# What the issue asks the dashboard to show, as the names the server exports them under.
REQUIRED = {
    "ray_serve_num_http_requests_total",  # request rate, status codes
    "ray_serve_num_http_error_requests_total",  # errors by route and code
    "ray_serve_http_request_latency_ms_bucket",  # latency percentiles per route
    "ray_serve_deployment_request_counter_total",  # per stage
    "ray_serve_deployment_error_counter_total",
    "ray_serve_deployment_processing_latency_ms_bucket",
    "ray_serve_deployment_queued_queries",  # queue depth
    "ray_serve_deployment_replica_healthy",  # replicas per stage
    "ray_qaserve_batch_size_bucket",  # batch sizes (deployments/replica.py, Ray's prefix)
}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OPS / "grafana-dashboard.json").read_text())
    return data


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


# --- reading PromQL (enough of it for a dashboard: selectors, ranges, grouping, calls) ---

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w$.:])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"bool", "offset", "and", "or", "unless", "inf", "nan", "atan2"}
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PromQL:
    """The metric names of an expression, the label names matched on each, the grouping
    labels (`by`, `on`...) and the metrics inside each aggregation's scope."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        text = _STRING.sub('""', expr)
        self.matched: dict[str, set[str]] = {}
        for m in _SELECTOR.finditer(text):
            if not m.group(1):
                raise ValueError(f"a selector without a metric name: {expr!r}")
            labels = set(_MATCHER.findall(m.group(2)))
            self.matched.setdefault(m.group(1), set()).update(labels)
        text = _SELECTOR.sub(lambda m: m.group(1) or "", text)
        text = _RANGE.sub("", text)
        self.grouping: set[str] = set()
        for m in _GROUPING.finditer(text):
            self.grouping.update(x.strip() for x in m.group(1).split(",") if x.strip())
        text = _GROUPING.sub("", text)
        self.metrics: set[str] = set()
        for m in _IDENT.finditer(text):
            name = m.group(0)
            called = text[m.end() :].lstrip().startswith("(")
            if not called and name not in _KEYWORDS:
                self.metrics.add(name)
        for name in self.matched:
            self.metrics.add(name)


def label_values_query(query: str) -> tuple[PromQL, str] | None:
    """`label_values(metric{...}, label)` (a Grafana variable) as its selector and label."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query)
    return (PromQL(m.group(1)), m.group(2)) if m else None


def queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target."""
    out = []
    for panel in all_panels(dash):
        for t in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} target {t['refId']}"
            out.append((where, t["expr"], t.get("legendFormat", "")))
    return out


def variable_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def exported(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def problems(dash: dict[str, Any], metrics: dict[str, set[str]]) -> list[str]:
    """What the dashboard asks for that `metrics` (sample name -> labels) does not have:
    metric names (histograms by their exported `_bucket`/`_sum`/`_count` sample names, as
    PromQL names them), labels matched on a metric, labels grouped by (on every metric of the
    expression; `le` comes with `_bucket`) and labels a legend prints."""
    found = []
    for where, expr, legend in queries(dash):
        q = PromQL(expr)
        if not q.metrics:
            found.append(f"{where}: no metric in {expr!r}")
        for name in sorted(q.metrics):
            if name not in metrics:
                found.append(f"{where}: {name} is not exported")
                continue
            for label in sorted(q.matched.get(name, set()) - metrics[name]):
                found.append(f"{where}: {name} has no label {label!r}")
            for label in sorted(q.grouping - metrics[name]):
                found.append(f"{where}: grouping by {label!r}, which {name} lacks")
        shown = q.grouping or set().union(*(metrics.get(n, set()) for n in q.metrics))
        for label in sorted(set(_LEGEND.findall(legend)) - shown):
            found.append(f"{where}: legend {{{{{label}}}}} is not a label of the result")
    for where, query in variable_queries(dash):
        parsed = label_values_query(query)
        if parsed is None:
            found.append(f"{where}: not label_values(metric, label): {query!r}")
            continue
        q, label = parsed
        for name in sorted(q.metrics):
            if name not in metrics:
                found.append(f"{where}: {name} is not exported")
            elif label not in metrics[name] or not q.matched.get(name, set()) <= metrics[name]:
                found.append(f"{where}: {name} lacks a label of {query!r}")
    return found


# --- fast: the files themselves ---


def test_promql_reading() -> None:
    q = PromQL(
        "histogram_quantile(0.95, sum by (route, le) (rate(ray_serve_http_request_latency_ms_bucket"
        '{application=~"$application", status_code!="404"}[$__rate_interval])))'
    )
    assert q.metrics == {"ray_serve_http_request_latency_ms_bucket"}
    assert q.matched == {"ray_serve_http_request_latency_ms_bucket": {"application", "status_code"}}
    assert q.grouping == {"route", "le"}
    q = PromQL(
        '(sum(rate(a_total{x="5.."}[5m])) or vector(0)) / sum without (y) (rate(b_sum[1m])) * 1e3'
    )
    assert q.metrics == {"a_total", "b_sum"}
    assert q.grouping == {"y"}
    assert PromQL("sum(up) by (job) > bool 0").metrics == {"up"}
    parsed = label_values_query('label_values(m{a=~"$a"}, deployment)')
    assert parsed is not None and parsed[0].matched == {"m": {"a"}} and parsed[1] == "deployment"


def test_dashboard_is_importable_grafana_json() -> None:
    dash = load_dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"] and dash.get("id") is None  # id: Grafana assigns it
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    text = json.dumps(dash)
    if "${DS_" in text:  # an exported dashboard's import-time inputs must be declared
        declared = {i["name"] for i in dash.get("__inputs", [])}
        assert set(re.findall(r"\$\{(DS_[A-Z_]+)\}", text)) <= declared
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    boxes = []
    for p in panels:
        assert p["title"], p["id"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["w"], g["h"]))
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat"}, p["type"]
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], (p["title"], t["refId"])
            assert t["expr"].strip(), (p["title"], t["refId"])
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
    for a, ax, ay, aw, ah in boxes:  # no two panels overlap on the grid
        for b, bx, by, bw, bh in boxes:
            if a < b:
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (a, b)
    for where, expr in [(w, e) for w, e, _ in queries(dash)] + variable_queries(dash):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= set(variables) | GRAFANA_BUILTINS, (where, used)


def test_dashboard_shows_what_operators_need() -> None:
    dash = load_dashboard()
    names = set().union(*(PromQL(e).metrics for _, e, _ in queries(dash)))
    assert names >= REQUIRED, REQUIRED - names
    assert all(n.startswith("ray_") for n in names), names


def test_the_check_catches_a_misspelled_metric_or_label() -> None:
    """The live check (below) is only worth its minutes if it can fail: against an exposition
    holding exactly what the dashboard asks for it passes, and a metric or label spelled
    differently in one target is reported."""
    dash = load_dashboard()
    wanted: dict[str, set[str]] = {}
    for _, expr, _ in queries(dash):
        q = PromQL(expr)
        for name in q.metrics:
            wanted.setdefault(name, set()).update(q.matched.get(name, set()) | q.grouping)
    for _, query in variable_queries(dash):
        parsed = label_values_query(query)
        assert parsed is not None
        for name in parsed[0].metrics:
            labels = parsed[0].matched.get(name, set()) | {parsed[1]}
            wanted.setdefault(name, set()).update(labels)
    assert problems(dash, wanted) == []

    text = json.dumps(dash)
    typo = json.loads(
        text.replace("ray_serve_num_http_requests_total", "ray_serve_num_http_request_total", 1)
    )
    found = problems(typo, wanted)
    assert found and all("ray_serve_num_http_request_total is not exported" in f for f in found)
    label = json.loads(text.replace("sum by (status_code)", "sum by (code)", 1))
    found = problems(label, wanted)
    assert any("grouping by 'code'" in f for f in found), found
    assert any("legend {{status_code}}" in f for f in found), found


def test_prometheus_config_scrapes_the_metrics_port() -> None:
    cfg = yaml.safe_load((OPS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = [t for sc in jobs["qaserve"]["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:8080"]  # `qaserve serve --metrics-port 8080`
    assert jobs["qaserve"].get("metrics_path", "/metrics") == "/metrics"
    raw = (OPS / "prometheus.yml").read_text()
    assert "/tmp/ray/prom_metrics_service_discovery.json" in raw and "file_sd_configs" in raw


# --- slow: the live server ---


def _graph_yaml(tiny_engine_config: Any, tmp_path: Path) -> Path:
    cfg = {
        "engine": tiny_engine_config.model_dump(mode="json") | {"data_dir": str(tmp_path / "data")},
        "stages": {name: {"ray_actor_options": {"num_cpus": 0.1}} for name in STAGES},
        # Both batched stages batch, so both `stage` values of the batch histogram exist.
        "batching": {
            "Retriever": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "Reader": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        },
    }
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _traffic(url: str) -> None:
    """One request of each kind the panels show: a write, filtered and concurrent (batched)
    extractive queries, an ensemble query (the Generator), a 422, a stage's 404, a route 404."""
    import httpx

    docs = [
        {
            "id": f"r{i}",
            "text": f"The battery lasts {i + 3} hours and the sound is clear.",
            "meta": {"item_id": "A" if i % 2 else "B"},
        }
        for i in range(6)
    ]
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("/v1/documents", json={"documents": docs}).status_code == 200
        body = {"question": "How long does the battery last?", "mode": "extractive"}
        r = http.post("/v1/query", json=body | {"filters": {"item_id": "A"}})
        assert r.status_code == 200, r.text
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(
                    lambda i: http.post("/v1/query", json=body | {"question": f"Battery {i}?"}),
                    range(16),
                )
            )
        assert [c.status_code for c in codes] == [200] * 16
        r = http.post("/v1/query", json={"question": "Is it loud?", "mode": "ensemble"})
        assert r.status_code == 200, r.text
        assert http.post("/v1/query", json={"mode": "nope"}).status_code == 422
        assert http.get("/v1/documents/no-such-id").status_code == 404
        assert http.get("/no-such-route").status_code == 404


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboard_queries_only_what_the_server_exports(
    tiny_engine_config: Any, tmp_path: Path
) -> None:
    import httpx

    dash = load_dashboard()
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "qaserve.cli", "serve", "--config"]
    cmd += [str(_graph_yaml(tiny_engine_config, tmp_path)), "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port), "--data-dir", str(tmp_path / "data")]
    cmd += ["--no-sample", "--num-cpus", "2"]
    server = ServerProcess.start(cmd, port, tmp_path / "serve.log", timeout_s=300)
    try:
        _traffic(server.url)
        # Ray's metrics agent exports what the processes recorded every ~10 s, and drops
        # a gauge ~20 s after its last update (the proxy's in-flight count and a batch
        # queue's length are set per request): what any scrape showed counts as exported.
        metrics: dict[str, set[str]] = {}
        deadline = time.monotonic() + 120
        while True:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
            for name, labels in exported(text).items():
                metrics.setdefault(name, set()).update(labels)
            found = problems(dash, metrics)
            if not found or time.monotonic() > deadline:
                break
            time.sleep(3)
        serve_names = sorted(n for n in metrics if n.startswith(("ray_serve_", "ray_qaserve")))
        assert not found, "\n".join(found) + "\nexported: " + " ".join(serve_names)
    finally:
        assert server.stop(120) is not None

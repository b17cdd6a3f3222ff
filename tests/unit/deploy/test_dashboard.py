"""The Grafana dashboard parses, queries only metrics the service exports, and has the key panels."""

import json
import re

import pytest
import yaml

from .conftest import ROOT

DASHBOARD = ROOT / "deploy/grafana/dashboards/textgen.json"

# The service's Prometheus metrics (contract), by type.
COUNTERS = {
    "textgen_requests_total",
    "textgen_generated_tokens_total",
    "textgen_prompt_tokens_total",
    "textgen_finished_requests_total",
    "textgen_rejected_requests_total",
    "textgen_cancelled_requests_total",
}
GAUGES = {"textgen_queue_size", "textgen_batch_size"}
HISTOGRAMS = {
    "textgen_request_duration_seconds",
    "textgen_time_to_first_token_seconds",
    "textgen_inter_token_latency_seconds",
    "textgen_e2e_latency_seconds",
    "textgen_queue_time_seconds",
}
LABELS = {
    "textgen_requests_total": {"route", "status"},
    "textgen_request_duration_seconds": {"route"},
    "textgen_finished_requests_total": {"finish_reason"},
}
EXPORTED = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def _exprs(dashboard) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_basics(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        if panel.get("type") != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]


def test_every_queried_metric_is_exported(dashboard):
    for expr in _exprs(dashboard):
        names = re.findall(r"\b(textgen_[a-z0-9_]+)", expr)
        assert names, f"query uses no textgen metric: {expr}"
        for name in names:
            assert name in EXPORTED, f"{name} (in {expr!r}) is not a metric the service exports"
        # rate()/increase() only on counters and histogram series, never on gauges
        for fn, name in re.findall(r"\b(rate|irate|increase)\((textgen_[a-z0-9_]+)", expr):
            assert name not in GAUGES, f"{fn}() over the gauge {name}"
        for name in re.findall(r"histogram_quantile\([^,]+,.*?\b(textgen_[a-z0-9_]+)", expr):
            assert name.endswith("_bucket"), f"histogram_quantile over {name}"
        for name, labels in re.findall(r"\b(textgen_[a-z0-9_]+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", labels)) - {"instance", "job"}
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert used <= LABELS.get(base, set()) | ({"le"} if name.endswith("_bucket") else set()), expr


def test_dashboard_has_the_key_panels(dashboard):
    exprs = _exprs(dashboard)
    joined = "\n".join(exprs)
    assert re.search(r"rate\(textgen_generated_tokens_total", joined), "throughput"
    ttft = [e for e in exprs if "textgen_time_to_first_token_seconds_bucket" in e]
    assert any("histogram_quantile(0.5," in e for e in ttft), "TTFT p50"
    assert any("histogram_quantile(0.99," in e for e in ttft), "TTFT p99"
    assert "textgen_queue_size" in joined
    assert "textgen_batch_size" in joined
    assert re.search(r"sum by \(status\) \(rate\(textgen_requests_total", joined), "requests/errors by status"


def test_dashboard_datasource_is_the_provisioned_one(dashboard):
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == uid
    for panel in _panels(dashboard):
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            assert ref in (None, {"type": "prometheus", "uid": "${datasource}"}), panel["title"]


def _app_exported() -> set[str]:
    metrics = pytest.importorskip("app.metrics")
    if not hasattr(metrics, "Metrics"):
        pytest.skip("app.metrics has no Metrics class")
    exported = set()
    for family in metrics.Metrics().registry.collect():
        if family.type == "counter":
            exported.add(family.name + "_total")
        elif family.type == "histogram":
            exported |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exported.add(family.name)
    return exported


def test_the_app_exports_every_metric_of_the_contract_and_dashboard(dashboard):
    exported = _app_exported()
    assert EXPORTED <= exported, f"the app lacks {sorted(EXPORTED - exported)}"
    queried = {n for e in _exprs(dashboard) for n in re.findall(r"\b(textgen_[a-z0-9_]+)", e)}
    assert queried <= exported

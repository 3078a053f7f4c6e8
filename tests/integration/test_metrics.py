"""/metrics: clean by `promtool check metrics`, the families the issue lists, true
values, and a real Prometheus server (Debian's package) scraping the node and
answering a query with the node's own count."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import MODEL, NodeProc, free_port

P = "ollama_distributed_"


def fetch(url: str, data: Any = None, timeout: float = 120) -> bytes:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return bytes(r.read())


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # scripts/apt-deps.sh installs it; `make test` runs that first
        pytest.fail(f"{name} is missing: run scripts/apt-deps.sh (Debian's prometheus package)")
    return path


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    total = 0.0
    for s in fams[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


@pytest.fixture(scope="module")
def scraped(node: NodeProc) -> str:
    """Metrics after a cold load and a real generation."""
    fetch(node.url + "/api/generate", {"model": MODEL, "prompt": "", "keep_alive": 0})  # unload
    out = json.loads(fetch(node.url + "/api/generate", {"model": MODEL, "prompt": "Count to three.",
                                                         "stream": False,
                                                         "options": {"num_predict": 8, "seed": 3}}))
    assert out["load_duration"] > 0 and out["eval_count"] > 0
    return fetch(node.url + "/metrics").decode()


def test_promtool_check_metrics_is_clean(scraped: str) -> None:
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=scraped, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_families_follow_conventions(scraped: str, node: NodeProc) -> None:
    fams = families(scraped)
    expected = {
        "requests": "counter", "request_duration_seconds": "histogram",
        "time_to_first_token_seconds": "histogram", "prompt_tokens": "counter",
        "prompt_tokens_cached": "counter", "prompt_tokens_evaluated": "counter",
        "generated_tokens": "counter", "queue_depth": "gauge", "in_flight_requests": "gauge",
        "models_loaded": "gauge", "model_load_seconds": "histogram", "peers": "gauge",
        "is_leader": "gauge", "build_info": "gauge",
    }
    for name, kind in expected.items():
        assert P + name in fams, (name, sorted(fams))
        assert fams[P + name].type == kind, (name, fams[P + name].type)
    assert "# TYPE ollama_distributed_requests_total counter" in scraped
    labels = {s.labels.get("endpoint") for s in fams[P + "requests"].samples if s.name.endswith("_total")}
    assert "/api/generate" in labels
    statuses = {s.labels["status"] for s in fams[P + "requests"].samples if s.name.endswith("_total")}
    assert "200" in statuses
    # values that are true, not placeholders; read together, so requests other
    # tests left finishing in the background land on both sides
    api = json.loads(fetch(node.url + "/api/distributed/metrics"))
    fams = families(fetch(node.url + "/metrics").decode())
    assert sample(fams, P + "generated_tokens", "_total", model=MODEL) > 0
    # every model's tokens: other tests generate with models of their own
    assert sample(fams, P + "generated_tokens", "_total") == api["tokens_generated"]
    # every request counts, the /api/distributed/metrics read too (a /metrics scrape does not)
    assert sample(fams, P + "requests", "_total") == api["requests_processed"] + 1
    assert sample(fams, P + "model_load_seconds", "_count", model=MODEL) >= 1
    assert sample(fams, P + "model_load_seconds", "_sum", model=MODEL) > 0
    assert sample(fams, P + "time_to_first_token_seconds", "_count", model=MODEL) >= 1
    # what /api/ps lists (other tests load models of their own on this shared node)
    assert sample(fams, P + "models_loaded") == len(json.loads(fetch(node.url + "/api/ps"))["models"]) >= 1
    assert sample(fams, P + "is_leader") == 1 and sample(fams, P + "peers") == 0
    assert not [f for f in fams if f.endswith("_created")]
    build = fams[P + "build_info"].samples[0]
    assert build.labels["version"] == api["version"]


def test_prometheus_scrapes_the_node(node: NodeProc, scraped: str, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ollama-distributed\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{node.api_port}']}}]\n"
    )
    check = subprocess.run([tool("promtool"), "check", "config", str(cfg)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={cfg}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        # the read of the count is itself counted once it is answered; the scrapes are not counted
        want = json.loads(fetch(node.url + "/api/distributed/metrics"))["requests_processed"] + 1
        query = f'sum({P}requests_total{{job="ollama-distributed"}})'
        deadline = time.monotonic() + 60
        got: list[Any] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                answer = json.loads(fetch(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}),
                                          timeout=5))
                got = answer["data"]["result"]
                if got:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert got, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(got[0]["value"][1]) == want
        targets = json.loads(fetch(f"{base}/api/v1/targets", timeout=5))["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        up = json.loads(fetch(f"{base}/api/v1/query?query=" + urllib.parse.quote(f"{P}build_info"),
                              timeout=5))["data"]["result"]
        assert up and up[0]["metric"]["version"]
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()

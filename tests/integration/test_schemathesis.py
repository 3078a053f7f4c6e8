"""schemathesis over /api/openapi.json against a throwaway node (mock engine):
every operation with generated requests, seeded and bounded (EXAMPLES per
operation, BUDGET_S in all), and no answer may be a 5xx. The node may pull
or push only to a closed port (models.registries), so nothing leaves the
machine."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import NodeProc, start_node

schemathesis = pytest.importorskip("schemathesis", reason="pip install -r requirements-dev.txt")
hypothesis = pytest.importorskip("hypothesis")

SEED = 20261201
# Per operation. $OD_SCHEMATHESIS_EXAMPLES digs deeper locally: 300 found
# nothing more here in about 95 s; 25 keep `make test` short (about 17 s).
EXAMPLES = int(os.environ.get("OD_SCHEMATHESIS_EXAMPLES", "25"))
BUDGET_S = float(os.environ.get("OD_SCHEMATHESIS_BUDGET_S", "240"))  # all operations together
CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = tmp / "c.yaml"
    cfg.write_text(json.dumps({"models": {"registries": ["127.0.0.1:9"]},
                               "engine": {"mock_tokens": 4}}))
    n = start_node(tmp, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    yield n
    n.stop()


def test_no_operation_answers_5xx(throwaway: NodeProc, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, Phase, given, seed, settings

    schema = schemathesis.openapi.from_url(throwaway.url + "/api/openapi.json")
    failures: list[str] = []
    counted: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET_S
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for op in operations:
        if time.monotonic() > deadline:
            failures.append(f"time budget of {BUDGET_S:.0f} s spent before {op.label}")
            break
        counted[op.label] = 0

        @seed(SEED)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: object) -> None:
            counted[op.label] += 1  # noqa: B023  (run is called at once, in this iteration)
            resp = case.call(base_url=throwaway.url, timeout=CALL_TIMEOUT_S)  # type: ignore[attr-defined]
            if resp.status_code >= 500:
                body = resp.text[:300]
                failures.append(f"{op.label}: {resp.status_code} for "  # noqa: B023
                                f"{case.as_curl_command(headers=None)[:400]}: {body}")  # type: ignore[attr-defined]

        run()
    print(json.dumps(counted, indent=1))
    assert not failures, "\n".join(failures)
    # the node is still itself after all that
    assert throwaway.proc.poll() is None
    assert json.loads(throwaway_get(throwaway, "/health/ready"))["status"] == "ready"


def throwaway_get(n: NodeProc, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(n.url + path, timeout=10) as r:
        return bytes(r.read())

"""schemathesis over /api/openapi.json against a throwaway node (mock engine):
every operation with generated requests, valid ones and invalid ones, seeded
and bounded (EXAMPLES per operation and mode, BUDGET_S in all). No answer may
be a 5xx, and every answer must match the document: a status code it lists,
a Content-Type it lists for that status, and a body its schema accepts
(each line of an NDJSON stream, each event of an SSE stream). The examples in
the document name the node's bundled model, so the explicit phase reaches the
successful answers too. The node may pull or push only to a closed port
(models.registries), so nothing leaves the machine."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import NodeProc, start_node

schemathesis = pytest.importorskip("schemathesis", reason="pip install -r requirements-dev.txt")
hypothesis = pytest.importorskip("hypothesis")

SEED = 20261201
# Per operation and mode (valid, invalid). $OD_SCHEMATHESIS_EXAMPLES digs deeper
# locally; 25 keep `make test` short (about 75 s on a busy 2-core machine).
EXAMPLES = int(os.environ.get("OD_SCHEMATHESIS_EXAMPLES", "25"))
BUDGET_S = float(os.environ.get("OD_SCHEMATHESIS_BUDGET_S", "240"))  # all operations together
CALL_TIMEOUT_S = 30.0
NDJSON = "application/x-ndjson"


def ndjson_lines(ctx: Any, response: Any) -> Any:
    """Checks every line of an NDJSON answer against the schema the document
    gives its lines (schemathesis reads no NDJSON itself); the last line goes
    on to schemathesis's own check."""
    import jsonschema_rs

    answer = ctx.operation.responses.find_by_status_code(response.status_code)
    validator = jsonschema_rs.validator_for(answer.definition["content"][NDJSON]["schema"])
    last: Any = None
    for i, line in enumerate(response.content.decode().splitlines(), 1):
        last = json.loads(line)
        for error in validator.iter_errors(last):
            raise ValueError(f"line {i} does not match the schema: {error.message} at "
                             f"{list(error.instance_path)}: {line[:200]}")
    if last is None:
        raise ValueError("an empty NDJSON stream")
    return last


schemathesis.deserializer(NDJSON)(ndjson_lines)


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = tmp / "c.yaml"
    cfg.write_text(json.dumps({"models": {"registries": ["127.0.0.1:9"]},
                               "engine": {"mock_tokens": 4}}))
    n = start_node(tmp, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    yield n
    n.stop()


def test_every_answer_matches_the_schema(throwaway: NodeProc) -> None:
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode
    from schemathesis.generation.hypothesis.builder import add_examples
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(throwaway.url + "/api/openapi.json")
    failures: dict[str, str] = {}  # one report per operation, check and status
    counted: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET_S
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                failures["budget"] = f"time budget of {BUDGET_S:.0f} s spent before {op.label} ({mode.value})"
                break
            label = f"{op.label} ({mode.value})"
            counted[label] = 0

            def run(case: Any) -> None:
                counted[label] += 1  # noqa: B023  (run is called at once, in this iteration)
                resp = case.call(base_url=throwaway.url, timeout=CALL_TIMEOUT_S)
                try:
                    case.validate_response(resp, checks=checks)
                except FailureGroup as group:
                    for f in group.exceptions:
                        key = f"{label}: {f.title} ({resp.status_code})"  # noqa: B023
                        failures.setdefault(key, f"{key}\n  {f.message[:500]}\n  "
                                            f"{case.as_curl_command(headers=None)[:400]}\n"
                                            f"  answered: {resp.text[:300]}")

            test = given(case=op.as_strategy(generation_mode=mode))(run)
            if mode == GenerationMode.POSITIVE:
                # the document's own examples first (the explicit phase), as schemathesis's runner adds them
                test = add_examples(test, op, fill_missing=False)
            test = seed(SEED)(settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                                       phases=[Phase.explicit, Phase.generate],
                                       suppress_health_check=list(HealthCheck))(test))
            try:
                test()
            except hypothesis.errors.Unsatisfiable:
                # No invalid request can be written for it (no body, and every path is a string)
                assert mode == GenerationMode.NEGATIVE and counted[label] == 0, label
    print(json.dumps(counted, indent=1))
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures.values())
    # the node is still itself after all that
    assert throwaway.proc.poll() is None
    assert json.loads(throwaway_get(throwaway, "/health/ready"))["status"] == "ready"


def throwaway_get(n: NodeProc, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(n.url + path, timeout=10) as r:
        return bytes(r.read())

"""The pure parts of the doors: origin and Host rules, redaction of secrets in
log lines, token buckets."""

from __future__ import annotations

import logging

import pytest
from ollama_distributed import logs
from ollama_distributed.security import redact
from ollama_distributed.security.limits import Bucket, retry_after
from ollama_distributed.security.origins import (
    OriginPolicy,
    interface_addresses,
    is_loopback_host,
    normalize_origin,
)


@pytest.mark.parametrize(("host", "loop"), [
    ("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True),
    ("app.localhost", True), ("localhost.evil.example", False), ("evil.example", False),
    ("0.0.0.0", False), ("10.0.0.1", False), ("", False),
])
def test_loopback_hosts(host: str, loop: bool) -> None:
    assert is_loopback_host(host) is loop


def test_origins() -> None:
    p = OriginPolicy("127.0.0.1", [8080, 8081], ["https://app.example", "http://x.example:9000/"])
    assert p.origin_allowed("http://localhost:5173") and p.origin_allowed("https://127.0.0.1")
    assert p.origin_allowed("http://[::1]:1") and p.origin_allowed("https://app.example")
    assert p.origin_allowed("http://x.example:9000") and not p.origin_allowed("http://x.example:9001")
    for bad in ("http://evil.example", "null", "file://", "http://localhost.evil.example", "",
                "chrome-extension://abc", "http://127.0.0.1.evil.example"):
        assert not p.origin_allowed(bad), bad
    assert OriginPolicy("127.0.0.1", [1], ["*"]).origin_allowed("http://evil.example")
    assert normalize_origin("HTTPS://App.Example:443") == "https://app.example"


def test_hosts() -> None:
    loop = OriginPolicy("127.0.0.1", [8080], allowed_hosts=["llm.internal"])
    assert loop.host_allowed("localhost:8080") and loop.host_allowed("llm.internal")
    assert not loop.host_allowed("evil.example") and loop.host_allowed(None)
    anywhere = OriginPolicy("0.0.0.0", [8080])
    assert anywhere.host_allowed("evil.example")  # bound everywhere with no list: any Host
    for ip in interface_addresses() - {"127.0.0.1", "::1"}:  # a page opened by the machine's address
        host = f"[{ip}]" if ":" in ip else ip
        assert anywhere.origin_allowed(f"http://{host}:8080") and not anywhere.origin_allowed(f"http://{host}:9")
    listed = OriginPolicy("0.0.0.0", [8080], allowed_hosts=["llm.internal"])
    assert listed.host_allowed("llm.internal:8080") and not listed.host_allowed("evil.example")


def test_log_lines_never_carry_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    token = "OD1:" + "0f" * 32 + ":s3cr3t-join"
    key = "odk_" + "A" * 43
    redact.add_secret("hunter2-admin")
    logs.setup("info")
    logging.getLogger("t").warning("join with %s, key %s, Authorization: Bearer abcdefghijkl, "
                                   "token hunter2-admin", token, key)
    err = capsys.readouterr().err
    for secret in ("s3cr3t-join", key, "abcdefghijkl", "hunter2-admin"):
        assert secret not in err, err
    assert "OD1:<redacted>" in err and "odk_<redacted>" in err


def test_bucket() -> None:
    b = Bucket(60)  # one a second, burst 60
    now = b.stamp
    assert all(b.take(1, now) == 0.0 for _ in range(60))
    assert b.take(1, now) == pytest.approx(1.0)
    assert b.take(1, now + 1.0) == 0.0
    b.take(30, now + 1.0, force=True)  # tokens spent after the fact drive it below zero
    assert b.wait(now + 1.0) == pytest.approx(30.0, abs=0.01)
    assert retry_after(0.2) == 1 and retry_after(29.01) == 30
    shared = Bucket(60, 20)
    assert sum(shared.take(1, shared.stamp) == 0.0 for _ in range(60)) == 20

"""Two hosts under systemd: two nspawn guests, each in a network namespace of
its own, joined by a veth pair. The second joins the first with the token from
`ollama-distributed cluster token`, and a generate sent to one node is served
by the other (seen in both nodes' Prometheus counters).

Each host registers the bundled model under its own name (models.default),
with models.replicas 1, so a request for A's model sent to B can only be
served by A, and the other way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from systemtier import DIST, UNIT, Guest, step

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

CONF = "/etc/ollama-distributed/config.yaml"
API = "http://127.0.0.1:8080"
MODEL_A = "smollm2:135m"
MODEL_B = "smollm2:host-b"
# Test hosts' own addresses, only inside the namespaces this test creates.
SUBNET = "10.231.7"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    tag = os.getpid() % 100000
    a, b = f"od-sys-a-{tag}", f"od-sys-b-{tag}"
    va, vb = f"odva{tag}", f"odvb{tag}"
    ip("netns", "add", a)
    ip("netns", "add", b)
    try:
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", a)
        ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, f"{SUBNET}.1/24"), (b, vb, f"{SUBNET}.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], check=False)
        subprocess.run(["ip", "netns", "del", b], check=False)


def configure(g: Guest, p2p_host: str, model: str, join: str = "", token: str = "") -> None:
    # replicas: 1 keeps each model on its own host, so only forwarding can serve it elsewhere
    conf = g.read(CONF) + f"\nmodels:\n  default: {json.dumps(model)}\n  replicas: 1\n"
    conf = re.sub(r"(?m)^(p2p:\n(?:  #.*\n)*)  host: .*$", rf"\g<1>  host: {p2p_host}", conf)
    assert f"  host: {p2p_host}" in conf, "packaged config has no p2p.host to set"
    conf = conf.replace("  join: []", f"  join: [{json.dumps(join)}]" if join else "  join: []")
    conf = conf.replace('  token: ""', f"  token: {json.dumps(token)}")
    g.write(CONF, conf)


def counter(g: Guest, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter's samples on that node that match labels."""
    text = g.curl("-f", f"{API}/metrics").stdout
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def node_id(g: Guest) -> str:
    return str(json.loads(g.curl("-f", f"{API}/health").stdout)["node_id"])


def generate(g: Guest, model: str, prompt: str) -> dict[str, object]:
    body = json.dumps({"model": model, "prompt": prompt, "stream": False,
                       "options": {"num_predict": 8}})
    return json.loads(g.curl("-f", "-H", "Content-Type: application/json", "-d", body,
                             f"{API}/api/generate").stdout)  # type: ignore[no-any-return]


def test_second_host_joins_and_serves(
    packages: dict[str, Path], two_netns: tuple[str, str],
    guest_factory: Callable[..., Guest],
) -> None:
    ns_a, ns_b = two_netns
    step("boot two guests, one per network namespace")
    a = guest_factory("od-host-a", netns=ns_a, binds={str(DIST): "/mnt/dist"})
    b = guest_factory("od-host-b", netns=ns_b, binds={str(DIST): "/mnt/dist"})
    deb = f"/mnt/dist/{packages['deb'].name}"
    errors: list[BaseException] = []

    def install(g: Guest) -> None:
        try:
            g.run("apt-get", "install", "-y", "-q", deb, timeout=300)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=install, args=(g,)) for g in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    has_token = a.run("ollama-distributed", "cluster", "token", "--help", check=False)
    if has_token.returncode != 0:
        pytest.skip("`ollama-distributed cluster token` is not in this build (issue 4): "
                    + (has_token.stderr.strip().splitlines() or ["no such command"])[-1])

    step("host A: first node, leader")
    configure(a, f"{SUBNET}.1", MODEL_A)
    a.run("systemctl", "enable", "--now", UNIT, timeout=180)
    token = ""
    deadline = time.monotonic() + 60
    while not token:
        r = a.run("ollama-distributed", "cluster", "token", check=False)
        words = r.stdout.split()
        if r.returncode == 0 and words:
            token = words[-1]
        elif time.monotonic() > deadline:
            raise AssertionError(f"no cluster token from A: {r.stdout} {r.stderr}\n{a.journal()}")
        else:
            time.sleep(1)

    step("host B: joins A with the token")
    configure(b, f"{SUBNET}.2", MODEL_B, join=f"{SUBNET}.1:4001", token=token)
    b.run("systemctl", "enable", "--now", UNIT, timeout=180)
    id_a, id_b = node_id(a), node_id(b)
    deadline = time.monotonic() + 90
    while True:
        nodes = json.loads(b.curl("-f", f"{API}/api/distributed/nodes").stdout)
        listed = json.dumps(nodes)
        if id_a in listed and id_b in listed:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"B never saw A: {listed}\n{b.journal(lines=60)}")
        time.sleep(1)

    for entry, other, other_id, model in ((b, a, id_a, MODEL_A), (a, b, id_b, MODEL_B)):
        step(f"generate {model} at {entry.name}: only {other.name} holds it")
        fwd0 = counter(entry, "ollama_distributed_forwarded_requests_total", peer=other_id,
                       outcome="ok")
        tok0 = counter(other, "ollama_distributed_generated_tokens_total")
        t0 = time.monotonic()
        while True:  # the peer's model list arrives with its next advert
            try:
                out = generate(entry, model, "Name three colours of the rainbow.")
                break
            except AssertionError:
                if time.monotonic() - t0 > 20:
                    for g in (entry, other):
                        print(f"--- {g.name}: /api/distributed/nodes")
                        print(g.curl(f"{API}/api/distributed/nodes", check=False).stdout)
                        print(g.journal(lines=40))
                    raise
                time.sleep(1)
        print(f"{time.monotonic() - t0:.1f} s: {out.get('response')!r}")
        assert out["done"] is True and str(out["response"]).strip()
        fwd1 = counter(entry, "ollama_distributed_forwarded_requests_total", peer=other_id,
                       outcome="ok")
        tok1 = counter(other, "ollama_distributed_generated_tokens_total")
        assert fwd1 == fwd0 + 1, f"{entry.name} did not forward to {other.name}"
        assert tok1 > tok0, f"{other.name} generated nothing"

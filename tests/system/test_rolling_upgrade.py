"""A rolling upgrade under load (issue 13): three hosts under systemd, one
cluster, a continuous client load, and `apt install` of the next .deb on each
host in turn; then `systemctl restart` of the Raft leader. Zero failed requests.

The network: each guest boots in a network namespace of its own, joined by a
veth pair to a bridge in a hub namespace (all created here). The client load
(loadgen.py) runs in the hub namespace and reaches every host's API at
10.231.8.{1,2,3}:8080, as clients behind a load balancer would.

Which host the clients talk to: one at a time, the "entry". A client's TCP
connection ends at its entry host, so that host's own restart cannot be hidden
from the requests it is serving as entry (README: "What clients see"). So, as a
load balancer would, the load moves to another host before its entry is
upgraded: requests already under way there finish during the drain, new ones go
to the other host. Every other host is upgraded while it serves requests
forwarded from the entry, which is what drain and migration must hide.

The next version: the first .deb with its control version bumped (dpkg-deb
repack, uncompressed so it is quick). dpkg then runs the upgrade path of the
maintainer scripts: prerm upgrade keeps the node running, postinst restarts it
(SIGTERM: drain, then the new process).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from systemtier import CACHE, DIST, UNIT, Guest, step

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

CONF = "/etc/ollama-distributed/config.yaml"
LOCAL = "http://127.0.0.1:8080"
MODEL = "smollm2:135m"
# Test hosts' own addresses, only inside the namespaces this test creates.
SUBNET = "10.231.8"
HOSTS = ("a", "b", "c")
LOADGEN = Path(__file__).with_name("loadgen.py")
# Requests each phase sees at least, so a phase is never an empty claim.
MIN_PER_PHASE = 4


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def hub_netns() -> Iterator[dict[str, str]]:
    """A hub namespace with a bridge, and one namespace per host wired to it."""
    tag = os.getpid() % 100000
    hub = f"od-up-hub-{tag}"
    spaces = {h: f"od-up-{h}-{tag}" for h in HOSTS}
    ip("netns", "add", hub)
    try:
        for ns in spaces.values():
            ip("netns", "add", ns)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        ip("-n", hub, "link", "set", "lo", "up")
        for i, (h, ns) in enumerate(spaces.items(), start=1):
            inner, outer = f"odu{h}{tag}", f"odh{h}{tag}"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "netns", hub)
            ip("-n", hub, "link", "set", outer, "master", "br0")
            ip("-n", hub, "link", "set", outer, "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield {"hub": hub, **spaces}
    finally:
        for ns in (*spaces.values(), hub):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def bumped_deb(deb: Path, out: Path) -> tuple[Path, str]:
    """The same package with the next version: unpack, bump the control
    Version, pack uncompressed (seconds, not minutes of xz)."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = (tree / "DEBIAN/control").read_text()
    old = re.search(r"(?m)^Version: (\S+)$", control)
    assert old, control
    new = old.group(1).replace("-", "+next-", 1) if "-" in old.group(1) else old.group(1) + "+next"
    (tree / "DEBIAN/control").write_text(control.replace(f"Version: {old.group(1)}", f"Version: {new}"))
    target = out / f"ollama-distributed_{new}.deb"
    subprocess.run(["dpkg-deb", "-Znone", "-b", str(tree), str(target)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    # the new version must sort above the old one, or apt would not call it an upgrade
    subprocess.run(["dpkg", "--compare-versions", new, "gt", old.group(1)], check=True)
    return target, new


def configure(g: Guest, addr: str, join: str = "", token: str = "") -> None:
    conf = g.read(CONF)
    conf = re.sub(r"(?m)^(api:\n(?:  #.*\n)*)  host: .*$", r"\g<1>  host: 0.0.0.0", conf)
    conf = re.sub(r"(?m)^(p2p:\n(?:  #.*\n)*)  host: .*$", rf"\g<1>  host: {addr}", conf)
    assert "  host: 0.0.0.0" in conf and f"  host: {addr}" in conf, conf
    if join:
        conf = conf.replace("  join: []", f"  join: [{json.dumps(join)}]")
        conf = conf.replace('  token: ""', f"  token: {json.dumps(token)}")
    g.write(CONF, conf)


def get(g: Guest, path: str) -> dict[str, object]:
    return json.loads(g.curl("-f", f"{LOCAL}{path}", timeout=20).stdout)  # type: ignore[no-any-return]


def node_list(g: Guest) -> list[dict[str, object]]:
    out = get(g, "/api/distributed/nodes")
    return out["nodes"] if isinstance(out, dict) else out  # type: ignore[return-value]


def wait_all_back(hosts: dict[str, Guest], ids: set[str], timeout: float, what: str) -> None:
    """Every host ready (/health/ready 200) and seeing all of `ids` active,
    not draining, with the model advertised."""
    deadline = time.monotonic() + timeout
    while True:
        missing = []
        for h, g in hosts.items():
            ready = g.curl("-o", "/dev/null", "-w", "%{http_code}", f"{LOCAL}/health/ready",
                           check=False, timeout=10).stdout.strip()
            if ready != "200":
                missing.append(f"{h}: ready {ready}")
                continue
            try:
                nodes = node_list(g)
            except (AssertionError, ValueError) as e:
                missing.append(f"{h}: nodes {e}")
                continue
            seen = {str(n["id"]) for n in nodes if n["status"] == "active" and not n.get("draining")
                    and MODEL in json.dumps(n.get("models"))}
            if seen != ids:
                missing.append(f"{h} sees {sorted(seen)}")
        if not missing:
            return
        if time.monotonic() > deadline:
            for g in hosts.values():
                print(g.journal(lines=30))
            raise AssertionError(f"{what}: not all back after {timeout:.0f} s: {missing}")
        time.sleep(1)


class Load:
    """loadgen.py in the hub namespace; the test moves it with `at`."""

    def __init__(self, hub: str, tmp: Path):
        self.control = tmp / "control.json"
        self.log = tmp / "requests.jsonl"
        self.target = ""
        self.phase = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.hub = hub

    def at(self, target: str, phase: str) -> None:
        self.target, self.phase = target, phase
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"target": target, "phase": phase, "stop": False}))
        tmp.replace(self.control)  # atomic: the workers never see half a file
        print(f"--- load: phase {phase!r}, clients at {target}", flush=True)

    def start(self, target: str, phase: str) -> None:
        self.at(target, phase)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.hub, sys.executable, str(LOADGEN),
                                      str(self.control), str(self.log), "--workers", "3", "--model", MODEL])

    def stop(self) -> None:
        self.control.write_text(json.dumps({"target": self.target, "phase": self.phase, "stop": True}))
        if self.proc is not None:
            try:
                self.proc.wait(timeout=200)  # liveness: the last requests finish
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise

    def records(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def count(self, phase: str) -> int:
        return sum(1 for r in self.records() if r["phase"] == phase)

    def wait_requests(self, phase: str, n: int, timeout: float = 120) -> None:
        """At least n requests finished in this phase (the phase is not empty)."""
        deadline = time.monotonic() + timeout
        while self.count(phase) < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"loadgen exited {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.count(phase)} requests in phase {phase!r} after {timeout} s")
            time.sleep(0.5)


def leader(g: Guest) -> str:
    return str(get(g, "/api/distributed/status")["leader_id"])


def handovers(g: Guest) -> int:
    """How many times this host's node logged a handover of the lead."""
    return int(g.journal(lines=100000).count("leadership handed to"))


def term(g: Guest) -> int:
    return int(str(get(g, "/api/distributed/status").get("term") or 0))


def test_rolling_upgrade_under_load(
    packages: dict[str, Path], hub_netns: dict[str, str],
    guest_factory: Callable[..., Guest],
) -> None:
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="rolling-", dir=CACHE))
    step("the next version: the .deb repacked with a bumped control version")
    next_deb, next_version = bumped_deb(packages["deb"], tmp)
    print(f"{packages['deb'].name} -> {next_deb.name}")

    step("boot three guests, one per network namespace, and install the first .deb")
    binds = {str(DIST): "/mnt/dist", str(tmp): "/mnt/next"}
    hosts: dict[str, Guest] = {}
    errors: list[BaseException] = []

    def boot_install(h: str) -> None:
        try:
            g = guest_factory(f"od-up-{h}", netns=hub_netns[h], binds=binds)
            hosts[h] = g
            g.run("apt-get", "install", "-y", "-q", f"/mnt/dist/{packages['deb'].name}", timeout=400)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=boot_install, args=(h,)) for h in HOSTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    addr = {h: f"{SUBNET}.{i}" for i, h in enumerate(HOSTS, start=1)}

    step("host a: first node and leader; b and c join it with its token")
    configure(hosts["a"], addr["a"])
    hosts["a"].run("systemctl", "enable", "--now", UNIT, timeout=180)
    token = ""
    deadline = time.monotonic() + 60
    while not token:
        r = hosts["a"].run("ollama-distributed", "cluster", "token", check=False)
        if r.returncode == 0 and r.stdout.split():
            token = r.stdout.split()[-1]
        elif time.monotonic() > deadline:
            raise AssertionError(f"no cluster token: {r.stdout} {r.stderr}")
        else:
            time.sleep(1)
    for h in ("b", "c"):
        configure(hosts[h], addr[h], join=f"{addr['a']}:4001", token=token)
        hosts[h].run("systemctl", "enable", "--now", UNIT, timeout=180)
    ids = {h: str(get(g, "/health")["node_id"]) for h, g in hosts.items()}
    members = set(ids.values())
    wait_all_back(hosts, members, 180, "cluster formed")
    first_leader = leader(hosts["b"])
    assert first_leader == ids["a"], f"leader {first_leader}, expected a ({ids['a']})"
    print(f"cluster: {ids}, leader a; formed {time.monotonic() - t_start:.0f} s into the test")

    load = Load(hub_netns["hub"], tmp)
    phases: list[str] = []
    try:
        step("steady load at b")
        load.start(addr["b"], "steady (clients at b)")
        phases.append(load.phase)
        load.wait_requests(load.phase, MIN_PER_PHASE * 2, timeout=300)  # the first loads the model

        for h in HOSTS:
            g = hosts[h]
            entry = load.target
            if entry == addr[h]:  # the load balancer takes the host out of the pool first
                entry = addr[HOSTS[(HOSTS.index(h) + 1) % len(HOSTS)]]
            entry_name = next(k for k, v in addr.items() if v == entry)
            load.at(entry, f"apt install on {h} (clients at {entry_name})")
            phases.append(load.phase)
            step(f"apt install the next .deb on {h} under load at {entry_name}")
            pid0 = g.show("MainPID")["MainPID"]
            t0 = time.monotonic()
            g.run("apt-get", "install", "-y", "-q", f"/mnt/next/{next_deb.name}", timeout=400)
            installed = g.run("dpkg-query", "-W", "-f", "${Version}", "ollama-distributed").stdout
            assert installed == next_version, installed
            state = g.wait_unit(lambda s: s["ActiveState"] == "active", 60, "the unit active again")
            assert state["MainPID"] != pid0, f"{h}: the node was not restarted by the upgrade ({state})"
            wait_all_back(hosts, members, 180, f"after the upgrade of {h}")
            lead = leader(g)
            print(f"{h}: {installed} running (pid {pid0} -> {state['MainPID']}), back in "
                  f"{time.monotonic() - t0:.0f} s; leader {next(k for k, i in ids.items() if i == lead)}, "
                  f"term {term(g)}")
            load.wait_requests(load.phase, MIN_PER_PHASE)

        step("systemctl restart of the leader under load at another host")
        lead = leader(hosts["a"])
        lead_host = next(h for h, i in ids.items() if i == lead)
        entry_name = HOSTS[(HOSTS.index(lead_host) + 1) % len(HOSTS)]
        load.at(addr[entry_name], f"restart leader {lead_host} (clients at {entry_name})")
        phases.append(load.phase)
        load.wait_requests(load.phase, 2)
        handed = handovers(hosts[lead_host])
        t0 = time.monotonic()
        hosts[lead_host].run("systemctl", "restart", UNIT, timeout=120)
        wait_all_back(hosts, members, 180, f"after the restart of {lead_host}")
        new_lead = leader(hosts[entry_name])
        print(f"leader {lead_host} restarted, back in {time.monotonic() - t0:.0f} s; leader now "
              f"{next(h for h, i in ids.items() if i == new_lead)}, term {term(hosts[entry_name])}")
        assert new_lead != lead, "the restarted leader leads again"
        # the draining leader handed over before it stopped (rust/consensus/handover.rs)
        assert handovers(hosts[lead_host]) == handed + 1, hosts[lead_host].journal(lines=60)
        load.wait_requests(load.phase, MIN_PER_PHASE)
    finally:
        load.stop()

    step("requests per phase")
    recs = load.records()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'phase':<40} {'sent':>5} {'failed':>6} {'p50 s':>6} {'max s':>6}   by kind (ok/sent)")
    for ph in phases:
        rs = [r for r in recs if r["phase"] == ph]
        kinds = "  ".join(f"{k}:{sum(1 for r in rs if r['kind'] == k and r['ok'])}/"
                          f"{sum(1 for r in rs if r['kind'] == k)}"
                          for k in sorted({str(r["kind"]) for r in rs}))
        secs = [float(r["seconds"]) for r in rs] or [0.0]  # type: ignore[arg-type]
        print(f"{ph:<40} {len(rs):>5} {sum(1 for r in rs if not r['ok']):>6} "
              f"{statistics.median(secs):>6.1f} {max(secs):>6.1f}   {kinds}")
    print(f"{'total':<40} {len(recs):>5} {sum(1 for r in recs if not r['ok']):>6}")
    t_first = min((float(r["start"]) for r in recs), default=0.0)  # type: ignore[arg-type]
    for r in sorted(recs, key=lambda r: -float(r["seconds"]))[:5]:  # type: ignore[arg-type]
        print(f"  slow: {float(r['seconds']):5.1f} s  {r['kind']:<19} at {r['target']} "  # type: ignore[arg-type]
              f"from t={float(r['start']) - t_first:5.1f} s  ({r['phase']})")  # type: ignore[arg-type]
    for h, g in hosts.items():  # what the nodes did to hide the restarts, from their journals
        log = g.journal(lines=100000)
        print(f"{h}: {log.count('moves from node')} request(s) moved, {log.count('peer silent')} of them "
              f"after a silent peer; {log.count('leadership handed to')} handover(s); "
              f"{log.count('queued one(s) sent elsewhere')} drain(s)")
    print(f"whole test: {time.monotonic() - t_start:.0f} s")
    failed = [r for r in recs if not r["ok"]]
    assert not failed, "failed requests:\n" + "\n".join(json.dumps(r) for r in failed[:20])
    for ph in phases:
        assert len([r for r in recs if r["phase"] == ph]) >= MIN_PER_PHASE, ph

    step("the same cluster: same members, every node active, one leader")
    for h, g in hosts.items():
        nodes = node_list(g)
        assert {str(n["id"]) for n in nodes} == members, f"{h}: {nodes}"
        assert all(n["status"] == "active" for n in nodes), f"{h}: {nodes}"
    leaders = {leader(g) for g in hosts.values()}
    assert len(leaders) == 1 and leaders <= members, leaders
    kinds_seen = {r["kind"] for r in recs}
    assert len(kinds_seen) == 4, kinds_seen

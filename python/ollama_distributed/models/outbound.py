"""Talking to a registry host, and where that may go (SSRF guards).

`Registry` is one host: its scheme (https first; plain HTTP only when the
request is `insecure`), its bearer token (a token request as Docker clients
make it, on a `WWW-Authenticate: Bearer realm=...` challenge; a username and
password, Basic or for the token service, come from ~/.netrc or $NETRC), and
redirects followed by hand. Registry failures are 502s, never 401s: a 401 from
the node means its own API token. Their messages name the host and the
status, and at most the OCI error codes; never the remote body, which could be
anything.

Outbound requests are guarded (SSRF): `models.registries`, when set, lists the
only hosts a pull or push may reach, redirects included (followed by hand, each
hop checked, at most MAX_REDIRECTS); a token realm must be https unless the
request is `insecure`, and on an allowed host; link-local addresses
(169.254.0.0/16, fe80::/10: cloud metadata services) are refused, whether
named in a URL or resolved from a name, unless listed by address.
registry.py pulls and pushes through it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from ..errors import OllamaDistributedError

TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
# A manifest is a few hundred bytes; anything this big is not one (nor a token answer).
MAX_MANIFEST = 4 << 20


class RegistryError(OllamaDistributedError):
    """The registry could not be reached, refused, or answered something unusable."""

    status = 502


class RegistryForbiddenError(OllamaDistributedError):
    """This node's config does not let it reach that host (models.registries,
    a link-local address, a plain-HTTP token realm)."""

    status = 403


MAX_REDIRECTS = 10
_OCI_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


def _link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_link_local
    except ValueError:
        return False


class Policy:
    """Where a pull or push may go: `allowed` is models.registries (host, or
    host:port; empty: any host but a link-local address)."""

    def __init__(self, allowed: list[str] | None = None) -> None:
        self.entries: set[tuple[str, int | None]] = set()
        for entry in allowed or []:
            u = yarl.URL(f"//{entry.strip()}")
            if u.host:
                self.entries.add((u.host.lower().strip("[]"), u.explicit_port))

    def _listed(self, host: str, port: int | None) -> bool:
        h = host.lower().strip("[]")
        return (h, None) in self.entries or (h, port) in self.entries

    def ip_allowed(self, ip: str) -> bool:
        """A resolved or literal address: link-local only when listed by address."""
        return not _link_local(ip) or any(h == ip.strip("[]").lower() for h, _ in self.entries)

    def check(self, url: yarl.URL, what: str) -> None:
        host = (url.host or "").lower()
        if self.entries and not self._listed(host, url.port):
            raise RegistryForbiddenError(f"{what} goes to {url.host}:{url.port}, which is not in "
                                         "models.registries; add it there to allow it")
        if not self.ip_allowed(host):
            raise RegistryForbiddenError(f"{what} goes to the link-local address {url.host}; list that "
                                         "address in models.registries to allow it")


class _GuardedResolver(AbstractResolver):
    """Name resolution that drops link-local answers the policy does not allow,
    so a name that resolves to a metadata service gets nowhere."""

    def __init__(self, policy: Policy) -> None:
        self._inner = ThreadedResolver()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        ok = [r for r in found if self._policy.ip_allowed(str(r["host"]))]
        if found and not ok:
            raise OSError(f"{host} resolves only to link-local addresses, which models.registries "
                          "does not list")
        return ok

    async def close(self) -> None:
        await self._inner.close()


# ---- talking to a registry --------------------------------------------------------------


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class Registry:
    """One registry host: its scheme (found on first contact) and its bearer token."""

    def __init__(self, session: aiohttp.ClientSession, host: str, insecure: bool,
                 policy: Policy | None = None) -> None:
        self.session = session
        self.host = host
        self.insecure = insecure
        self.scheme: str | None = None
        self.token: str | None = None
        self.policy = policy or Policy()
        self.policy.check(yarl.URL(f"https://{host}/"), f"registry {host}")

    async def _send(self, method: str, url: yarl.URL, headers: dict[str, str],
                    data: Callable[[], Any] | None) -> aiohttp.ClientResponse:
        """One request, following redirects by hand: each hop is checked
        against the policy, never downgraded to plain HTTP unless `insecure`,
        and loses the Authorization header when it leaves the registry's host."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self.session.request(method, url, headers=headers, data=data() if data else None,
                                              ssl=not self.insecure, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return resp
            resp.release()
            nxt = url.join(yarl.URL(location))
            self.policy.check(nxt, f"a redirect from registry {self.host}")
            if nxt.scheme == "http" and url.scheme == "https" and not self.insecure:
                raise RegistryForbiddenError(f"registry {self.host} redirected to plain HTTP ({nxt.host}); "
                                             "retry with insecure: true if you trust that path")
            if nxt.scheme not in ("http", "https"):
                raise RegistryError(f"registry {self.host} redirected to a {nxt.scheme or 'relative'} URL")
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, data = "GET", None
            if nxt.host != url.host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = nxt
        raise RegistryError(f"registry {self.host} redirected more than {MAX_REDIRECTS} times")

    def url(self, path: str) -> yarl.URL:
        return yarl.URL(f"{self.scheme or 'https'}://{self.host}{path}")

    async def request(self, method: str, target: str | yarl.URL, headers: dict[str, str] | None = None,
                      data: Callable[[], Any] | None = None) -> aiohttp.ClientResponse:
        """Send a request, choosing the scheme on first contact and answering one
        auth challenge. `target` is a path on the registry or a full URL (Location)."""
        if self.scheme is None:
            await self._choose_scheme()
        for attempt in range(2):
            url = self.url(target) if isinstance(target, str) else target
            hdrs = dict(headers or {})
            if self.token:
                hdrs["Authorization"] = f"Bearer {self.token}"
            try:
                resp = await self._send(method, url, hdrs, data)
            except aiohttp.ClientSSLError as e:
                raise RegistryError(f"TLS with registry {self.host} failed: {e}") from None
            if resp.status == 401 and attempt == 0 and "WWW-Authenticate" in resp.headers:
                challenge = resp.headers["WWW-Authenticate"]
                resp.release()
                await self._authenticate(challenge)
                continue
            return resp
        raise AssertionError("unreachable")

    async def _choose_scheme(self) -> None:
        """https first; plain HTTP only when `insecure` allows it."""
        try:
            async with self.session.get(yarl.URL(f"https://{self.host}/v2/"),
                                        ssl=not self.insecure, allow_redirects=False) as resp:
                await resp.read()
            self.scheme = "https"
            return
        except (TimeoutError, aiohttp.ClientSSLError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            https_error = e
        if not self.insecure:
            if _answers_http(https_error):
                raise RegistryError(
                    f"registry {self.host} does not speak https ({reason(https_error)}); if it is a "
                    f"plain-HTTP registry you trust, retry with insecure: true (--insecure)")
            raise RegistryError(f"cannot reach registry {self.host} over https: {reason(https_error)}")
        try:
            async with self.session.get(yarl.URL(f"http://{self.host}/v2/"), allow_redirects=False) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise RegistryError(f"cannot reach registry {self.host}: {reason(e)}") from None
        self.scheme = "http"

    async def _authenticate(self, challenge: str) -> None:
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            # aiohttp (trust_env) already sent what $NETRC or ~/.netrc holds for this host.
            machine = yarl.URL(f"http://{self.host}").host
            raise RegistryError(
                f"registry {self.host} wants a username and password and did not accept any: put them "
                f"in ~/.netrc (or $NETRC) of the user the node runs as, as 'machine {machine} login USER "
                "password PASSWORD'")
        if scheme.lower() != "bearer":
            raise RegistryError(f"registry {self.host} asks for {scheme} authentication, which this "
                                "node does not support; it supports Basic (from ~/.netrc) and bearer token realms")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.host} sent an unusable auth challenge (realm is not a URL)")
        realm_url = yarl.URL(realm)
        if realm_url.scheme != "https" and not self.insecure:
            raise RegistryForbiddenError(f"registry {self.host} sent a plain-HTTP token realm ({realm_url.host}); "
                                         "a token over plain HTTP is refused unless the pull or push is "
                                         "insecure: true")
        self.policy.check(realm_url, f"the token service of registry {self.host}")
        try:
            async with self.session.get(realm_url.update_query(params), ssl=not self.insecure,
                                        allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_MANIFEST)
                if resp.status != 200:
                    raise RegistryError(f"registry {self.host}: token service {realm_url.host} answered "
                                        f"{resp.status}")
        except aiohttp.ClientError as e:
            raise RegistryError(f"registry {self.host}: cannot reach its token service: {reason(e)}") from None
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {self.host}: token service answered without a token: {snippet(raw)}")
        self.token = token


def reason(e: BaseException) -> str:
    return str(e) or e.__class__.__name__


def _answers_http(e: BaseException) -> bool:
    """Whether https failed in the TLS handshake (the port answers, but not with TLS)."""
    if isinstance(e, aiohttp.ClientSSLError) or isinstance(getattr(e, "os_error", None), ssl.SSLError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("wrong version number", "record layer failure",
                                   "packet length too long", "unknown protocol"))


def snippet(raw: bytes) -> str:
    """What a body was, without echoing it: a remote body could be anything
    (an internal page reached by a redirect, a secret)."""
    if not raw.strip():
        return "(empty body)"
    kind = "JSON" if raw.lstrip()[:1] in (b"{", b"[") else "text" if b"\0" not in raw[:512] else "binary"
    return f"({len(raw)} bytes of {kind}, not shown)"


def open_session(policy: Policy | None = None) -> aiohttp.ClientSession:
    # Digests are over the bytes as stored: ask for them unencoded, and never
    # let a transparent gzip change what gets hashed. trust_env: HTTPS_PROXY and
    # NO_PROXY apply, as they do for Ollama.
    connector = aiohttp.TCPConnector(resolver=_GuardedResolver(policy or Policy()))
    return aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False, trust_env=True,
                                 headers={"Accept-Encoding": "identity"}, connector=connector)


async def error_body(resp: aiohttp.ClientResponse) -> str:
    """The OCI error codes of an error answer (`MANIFEST_UNKNOWN`), never its text."""
    with contextlib.suppress(Exception):
        raw = await resp.content.read(4096)
        with contextlib.suppress(ValueError, AttributeError, KeyError, IndexError, TypeError):
            codes = [str(e.get("code")) for e in json.loads(raw)["errors"]]
            shown = [c for c in codes if _OCI_CODE.match(c)]
            if shown:
                return ", ".join(shown[:5])
        return snippet(raw)
    return ""

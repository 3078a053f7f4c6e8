"""Configuration: YAML file, environment and flags, with typed validation.

Search order for the file: --config, $OLLAMA_DISTRIBUTED_CONFIG,
~/.ollama-distributed/config.yaml, /etc/ollama-distributed/config.yaml, then
built-in defaults. Precedence: flag > env OLLAMA_DISTRIBUTED_<SECTION>_<KEY> >
file > default. Unknown keys and wrong types are errors naming the file, the
key and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import env
from .errors import ConfigError

logger = logging.getLogger(__name__)

USER_CONFIG = Path("~/.ollama-distributed/config.yaml")
SYSTEM_CONFIG = Path("/etc/ollama-distributed/config.yaml")
ENGINES = ("llamacpp", "ollama", "openai", "mock")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ACCESS_LEVELS = ("info", "debug")
# The most voters Raft keeps (rust/consensus MAX_VOTERS): odd, survives two failures.
MAX_VOTERS = 5

# scheduler.policy, the default first (the Rust router's names, _core.POLICIES)
POLICIES = ("prefix_aware", "least_loaded", "round_robin")


@dataclass
class NodeSection:
    id: str = ""  # empty: generated once and kept in the data dir
    name: str = ""  # empty: the host name
    data_dir: str = ""  # empty: $STATE_DIRECTORY, else ~/.ollama-distributed
    # Free-form labels (gpu: "a100", zone: "rack1"); a model's placement policy
    # can require some (POST /api/distributed/placement).
    labels: dict[str, str] = field(default_factory=dict)
    # On SIGTERM (systemctl stop/restart, a package upgrade) or `cluster drain`,
    # requests under way get this long to finish; those still running after it
    # resume on another node (mid-stream migration). Keep the systemd unit's
    # TimeoutStopSec above it.
    drain_timeout_s: float = 30.0


@dataclass
class ApiSection:
    host: str = "127.0.0.1"
    port: int = 8080
    auth_tokens: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 * 1024 * 1024
    # Browser origins allowed besides the node's own and localhost/127.0.0.1/[::1]
    # on any port (Ollama's default set); a request with another Origin gets 403.
    # Entries are "scheme://host[:port]", or "*" for any.
    cors_origins: list[str] = field(default_factory=list)
    # Host header values accepted besides loopback names (DNS rebinding guard).
    # While the API binds a loopback address only loopback names pass unless
    # listed here; bound elsewhere, an empty list accepts any Host.
    allowed_hosts: list[str] = field(default_factory=list)
    # A per-request `template` (generate) is accepted, like Ollama, up to
    # max_template_bytes; false refuses it with 400.
    allow_request_templates: bool = True
    max_template_bytes: int = 64 * 1024
    # Proxies (addresses or CIDR networks) whose `X-Tenant` header names the
    # tenant a request is served as (fairness, queue shares). From anyone else
    # the header is ignored; with API keys in force the key's name is the tenant.
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass
class WebSection:
    host: str = "127.0.0.1"
    port: int = 8081
    enabled: bool = True
    # Dashboard WebSocket clients at once; more get 503.
    max_clients: int = 32


@dataclass
class P2PSection:
    host: str = "0.0.0.0"
    port: int = 4001
    join: list[str] = field(default_factory=list)
    token: str = ""
    # A file holding the join token (used when token is empty), so the token
    # need not appear on a command line or in the config file.
    token_file: str = ""
    enabled: bool = True
    # A peer silent this long is marked down (keep-alives go out 4 times within it).
    failure_timeout_ms: int = 2000
    # Caught-up learners become voters while there are fewer (1 to 5; the
    # leader's setting counts). Only voters hold the cluster CA key, so fewer
    # voters means fewer machines that can mint node certificates.
    max_voters: int = 5


@dataclass
class EngineSection:
    kind: str = "llamacpp"
    upstream: str = ""  # base URL for the ollama and openai engines
    keep_alive: str = "5m"
    max_loaded_models: int = 3
    # Requests one model runs at once (each slot has its own KV cache; the
    # weights are shared). 0: chosen at start from the model's KV cache per
    # slot and the memory available (engines/parallel.py).
    num_parallel: int = 0
    max_queue: int = 512
    threads: int = 0  # 0: one per core
    num_ctx: int = 2048
    # llamacpp: RAM for copies of prompt KV states kept warm beyond each slot's
    # own (engines/prefixcache.py), every loaded model within it; 0 keeps only
    # the slots' own. 512 MiB holds ~23 prefixes of 1,000 tokens of the bundled
    # SmolLM2 (22 KiB of KV a token), or ~4,000 tokens of an 8B GQA model
    # (128 KiB a token): a few tenants' system prompts, 2% of a 24 GiB machine.
    prompt_cache_mib: int = 512
    # mock engine only: time to first token and tokens per second
    mock_ttft_ms: float = 0.0
    mock_tokens_per_second: float = 0.0
    mock_tokens: int = 16
    # mock engine only: end a stream with an engine error after this many
    # tokens (0: never), to test mid-stream migration; a continuation never fails
    mock_fail_after_tokens: int = 0
    # Serve this machine's CPU backend over llama.cpp's ggml RPC (engines/rpc.py),
    # for a model split across nodes (issue 16). The server binds 127.0.0.1
    # only, by design: it authenticates nobody.
    rpc_server: bool = False
    rpc_port: int = 0  # 0: a free loopback port, chosen at each start
    # Memory offered to split models, advertised to the cluster; 0: the
    # machine's available memory at each advert.
    rpc_memory_mib: int = 0
    # The most memory one model's weights may take on this node; a larger one
    # is split across peers' RPC servers (engines/split.py) or refused (507).
    # 0: the machine's memory.
    max_model_memory_mib: int = 0


@dataclass
class SchedulerSection:
    # Where a request runs: prefix_aware (the node with the longest warm prompt
    # prefix, within a bounded load), least_loaded, or round_robin.
    policy: str = "prefix_aware"
    stale_after_ms: int = 3000
    advert_interval_ms: int = 1000
    retries: int = 2  # further holders tried when one fails before the first token
    # A stream with no first chunk after this long (a cold load of a large model
    # included) ends with a clear error; between chunks, stream_idle_timeout_s.
    first_token_timeout_s: float = 300.0
    stream_idle_timeout_s: float = 60.0
    # How many times one request may move to another holder after its first
    # chunk (a worker lost, wedged or failing mid-stream): the entry node resends
    # the prompt and the tokens already generated, and splices the streams.
    migration_limit: int = 3
    # Fairness of the local queue (rust/scheduler/fair.rs): one tenant (of
    # weight 1; a key's weight multiplies it) may fill this fraction of
    # engine.max_queue, beyond which it gets 429 while others are admitted.
    tenant_queue_share: float = 0.5
    # A batch request (X-Priority: batch) waits behind interactive work for at
    # most this long, then competes as interactive: never starved.
    batch_promote_after_s: float = 15.0


@dataclass
class ModelsSection:
    default: str = "smollm2:135m"  # "" registers no bundled model (a node that pulls its models)
    replicas: int = 2
    # Cap on peer-to-peer model transfers, in and out, in megabits per second,
    # so replication does not starve inference traffic; 0 = unlimited.
    replication_bandwidth_mbps: int = 0
    # Registry hosts (host or host:port; an IP for a link-local address) that
    # pull and push may reach, and that their redirects may go to. Empty: any
    # host except link-local addresses.
    registries: list[str] = field(default_factory=list)


@dataclass
class LoggingSection:
    level: str = "info"
    # One line per API request (method, path, status, duration, model), as
    # Ollama logs its requests: "info" shows them, "debug" hides them below it.
    access: str = "info"


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    api: ApiSection = field(default_factory=ApiSection)
    web: WebSection = field(default_factory=WebSection)
    p2p: P2PSection = field(default_factory=P2PSection)
    engine: EngineSection = field(default_factory=EngineSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    # Where the values came from; not a config key.
    source: str = field(default="built-in defaults", compare=False)

    def data_dir(self) -> Path:
        if self.node.data_dir:
            return Path(self.node.data_dir).expanduser()
        state = env.get(env.STATE_DIRECTORY)
        if state:
            return Path(state.split(":")[0])
        return Path("~/.ollama-distributed").expanduser()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def _describe(tp: Any) -> str:
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return "a list of strings"
    if typing.get_origin(tp) is dict:
        return "a mapping of names to strings (key=value,... in an environment variable)"
    return str(tp)


def _coerce(value: Any, tp: Any, where: str, key: str, from_text: bool) -> Any:
    """Check (or, for env and flags, parse) one value against its field type."""
    expected = _describe(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    if from_text and isinstance(value, str):
        if tp is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise bad()
        if tp is int:
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        if tp is float:
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if typing.get_origin(tp) is list:
            return [v.strip() for v in value.split(",") if v.strip()]
        if typing.get_origin(tp) is dict:
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            if not all("=" in p and p.split("=", 1)[0].strip() for p in pairs):
                raise bad()
            return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `keep_alive: 300` means 300 seconds, as in Ollama
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(tp) is list:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        return list(value)
    if typing.get_origin(tp) is dict:
        if value is None:
            return {}
        scalar = (str, int, float, bool)
        if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, scalar)
                                                  for k, v in value.items()):
            raise bad()
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    raise bad()


def _apply(cfg: Config, data: Any, where: str, from_text: bool = False) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown section {section!r}; expected one of: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section}: expected a mapping of keys")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key}; "
                    f"expected one of: {', '.join(hints)}"
                )
            setattr(obj, key, _coerce(value, hints[key], where, f"{section}.{key}", from_text))


def _validate(cfg: Config) -> None:
    where = cfg.source
    for section, key in (("api", "port"), ("web", "port"), ("p2p", "port")):
        port = getattr(getattr(cfg, section), key)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{where}: {section}.{key}: expected a port 0-65535, got {port}")
    if cfg.engine.kind not in ENGINES:
        raise ConfigError(
            f"{where}: engine.kind: expected one of {', '.join(ENGINES)}, got {cfg.engine.kind!r}"
        )
    if cfg.engine.kind in ("ollama", "openai") and not cfg.engine.upstream:
        raise ConfigError(
            f"{where}: engine.upstream: the {cfg.engine.kind} engine needs an upstream URL "
            "(set engine.upstream or pass --upstream)"
        )
    if cfg.scheduler.policy not in POLICIES:
        raise ConfigError(
            f"{where}: scheduler.policy: expected one of {', '.join(POLICIES)}, "
            f"got {cfg.scheduler.policy!r}"
        )
    if cfg.logging.level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"{where}: logging.level: expected one of {', '.join(LOG_LEVELS)}, "
            f"got {cfg.logging.level!r}"
        )
    if cfg.logging.access.lower() not in ACCESS_LEVELS:
        raise ConfigError(
            f"{where}: logging.access: expected one of {', '.join(ACCESS_LEVELS)}, "
            f"got {cfg.logging.access!r}"
        )
    if cfg.engine.num_parallel < 0:
        raise ConfigError(f"{where}: engine.num_parallel: expected an integer >= 0 (0: chosen from memory)")
    if not 0 < cfg.scheduler.tenant_queue_share <= 1:
        raise ConfigError(f"{where}: scheduler.tenant_queue_share: expected a fraction > 0 and <= 1")
    if cfg.scheduler.batch_promote_after_s < 0:
        raise ConfigError(f"{where}: scheduler.batch_promote_after_s: expected a number of seconds >= 0")
    for proxy in cfg.api.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: api.trusted_proxies: expected addresses or CIDR networks "
                              f"(such as 10.0.0.5 or 10.0.0.0/8), got {proxy!r}") from None
    for section, key in (
        ("engine", "max_loaded_models"),
        ("api", "max_body_bytes"),
        ("models", "replicas"),
        ("p2p", "failure_timeout_ms"),
        ("web", "max_clients"),
        ("api", "max_template_bytes"),
    ):
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{where}: {section}.{key}: expected a positive integer")
    if not 1 <= cfg.p2p.max_voters <= MAX_VOTERS:
        raise ConfigError(f"{where}: p2p.max_voters: expected an integer from 1 to {MAX_VOTERS}")
    if cfg.node.drain_timeout_s < 0:
        raise ConfigError(f"{where}: node.drain_timeout_s: expected a number of seconds >= 0")
    for key in ("first_token_timeout_s", "stream_idle_timeout_s"):
        if getattr(cfg.scheduler, key) <= 0:
            raise ConfigError(f"{where}: scheduler.{key}: expected a number of seconds > 0")
    for key in ("retries", "migration_limit"):
        if getattr(cfg.scheduler, key) < 0:
            raise ConfigError(f"{where}: scheduler.{key}: expected an integer >= 0")
    if not 0 <= cfg.engine.rpc_port <= 65535:
        raise ConfigError(f"{where}: engine.rpc_port: expected a port 0-65535 (0: any free one), "
                          f"got {cfg.engine.rpc_port}")
    if cfg.engine.rpc_memory_mib < 0:
        raise ConfigError(f"{where}: engine.rpc_memory_mib: expected an integer >= 0 (0: the memory available)")
    if cfg.engine.max_model_memory_mib < 0:
        raise ConfigError(f"{where}: engine.max_model_memory_mib: expected an integer >= 0 "
                          "(0: the machine's memory)")
    if cfg.engine.max_queue < 0:
        raise ConfigError(f"{where}: engine.max_queue: expected an integer >= 0")
    if cfg.engine.prompt_cache_mib < 0:
        raise ConfigError(f"{where}: engine.prompt_cache_mib: expected an integer >= 0 (0 = no kept prompt states)")
    if cfg.models.replication_bandwidth_mbps < 0:
        raise ConfigError(f"{where}: models.replication_bandwidth_mbps: expected an integer >= 0 (0 = unlimited)")
    from .duration import parse_keep_alive

    try:
        parse_keep_alive(cfg.engine.keep_alive)
    except ValueError as e:
        raise ConfigError(f"{where}: engine.keep_alive: {e}") from None


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (given with --config)")
        return path
    from_env = env.get(env.CONFIG)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (from ${env.CONFIG})")
        return path
    for candidate in (USER_CONFIG.expanduser(), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None


def env_overrides(environ: typing.Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """OLLAMA_DISTRIBUTED_<SECTION>_<KEY> variables as a nested mapping."""
    environ = os.environ if environ is None else environ
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(env.CONFIG_PREFIX):
            continue
        rest = name[len(env.CONFIG_PREFIX) :].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if key in typing.get_type_hints(SECTIONS[section]):
                    out.setdefault(section, {})[key] = value
                break
    return out


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config. `overrides` are the command-line flags."""
    cfg = Config()
    file = find_config_file(path)
    if file is not None:
        cfg.source = str(file)
        _apply(cfg, read_yaml(file), str(file))
    _apply(cfg, env_overrides(environ), "environment", from_text=True)
    if overrides:
        _apply(cfg, {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()},
               "command line")
    _read_token_file(cfg)
    _validate(cfg)
    return cfg


def _read_token_file(cfg: Config) -> None:
    """p2p.token from p2p.token_file, unless a token was given directly."""
    if cfg.p2p.token or not cfg.p2p.token_file:
        return
    path = Path(cfg.p2p.token_file).expanduser()
    try:
        cfg.p2p.token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"{cfg.source}: p2p.token_file: cannot read {path}: {e.strerror}") from None
    if not cfg.p2p.token:
        raise ConfigError(f"{cfg.source}: p2p.token_file: {path} is empty; write the output of "
                          "`ollama-distributed cluster token` into it")


# Keys whose values are secrets: `config show` and the logs never print them.
SECRET_KEYS = (("api", "auth_tokens"), ("p2p", "token"))


def redacted(data: dict[str, Any]) -> dict[str, Any]:
    """A to_dict() copy with the secret values replaced."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key in SECRET_KEYS:
        value = out.get(section, {}).get(key)
        if isinstance(value, list):
            out[section][key] = ["<redacted>" for _ in value]
        elif value:
            out[section][key] = "<redacted>"
    return out


def validate_file(path: Path) -> Config:
    cfg = Config(source=str(path))
    _apply(cfg, read_yaml(path), str(path))
    _validate(cfg)
    return cfg


def render_default() -> str:
    """A commented config file with every key at its default."""
    cfg = Config().to_dict()
    header = (
        "# ollama-distributed configuration. Every key is optional; these are the defaults.\n"
        "# Environment overrides: OLLAMA_DISTRIBUTED_<SECTION>_<KEY>, e.g. "
        "OLLAMA_DISTRIBUTED_API_PORT=9090\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)

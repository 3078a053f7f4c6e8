from __future__ import annotations

from pathlib import Path

import pytest
from ollama_distributed import config
from ollama_distributed.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OLLAMA_DISTRIBUTED_CONFIG", raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none.yaml")
    cfg = config.load(environ={})
    assert cfg.source == "built-in defaults"
    assert (cfg.api.host, cfg.api.port, cfg.web.port, cfg.p2p.port) == ("127.0.0.1", 8080, 8081, 4001)
    assert cfg.engine.kind == "llamacpp" and cfg.engine.max_queue == 512
    assert cfg.api.max_body_bytes == 32 * 1024 * 1024
    assert (cfg.models.replicas, cfg.models.replication_bandwidth_mbps) == (2, 0)


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ollama-distributed").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    system = write(tmp_path / "system.yaml", "api: {port: 1001}\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    monkeypatch.delenv("OLLAMA_DISTRIBUTED_CONFIG", raising=False)
    assert config.load(environ={}).api.port == 1001
    write(home / ".ollama-distributed" / "config.yaml", "api: {port: 1002}\n")
    assert config.load(environ={}).api.port == 1002
    env_file = write(tmp_path / "env.yaml", "api: {port: 1003}\n")
    monkeypatch.setenv("OLLAMA_DISTRIBUTED_CONFIG", str(env_file))
    assert config.load(environ={}).api.port == 1003
    flag_file = write(tmp_path / "flag.yaml", "api: {port: 1004}\n")
    assert config.load(flag_file, environ={}).api.port == 1004


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", "api: {port: 1000, host: 0.0.0.0}\nengine: {num_parallel: 2}\n")
    env = {"OLLAMA_DISTRIBUTED_API_PORT": "2000", "OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "3",
           "OLLAMA_DISTRIBUTED_API_AUTH_TOKENS": "a,b"}
    cfg = config.load(f, {"api": {"port": 3000, "host": None}}, environ=env)
    assert cfg.api.port == 3000  # flag
    assert cfg.engine.num_parallel == 3  # env over file
    assert cfg.api.host == "0.0.0.0"  # file over default; a None flag is "not given"
    assert cfg.api.auth_tokens == ["a", "b"]
    assert config.load(f, environ={"OLLAMA_DISTRIBUTED_P2P_MAX_VOTERS": "3"}).p2p.max_voters == 3


def test_prompt_cache_mib_from_file_and_environment(tmp_path: Path) -> None:
    other = write(tmp_path / "o.yaml", "engine: {num_ctx: 4096}\n")
    assert config.load(other, environ={}).engine.prompt_cache_mib == 512  # the default (config.py says why)
    f = write(tmp_path / "c.yaml", "engine: {prompt_cache_mib: 64}\n")
    assert config.load(f, environ={}).engine.prompt_cache_mib == 64
    env = {"OLLAMA_DISTRIBUTED_ENGINE_PROMPT_CACHE_MIB": "0"}
    assert config.load(f, environ=env).engine.prompt_cache_mib == 0  # env over file; 0 turns it off


@pytest.mark.parametrize("text,needle", [
    ("api: {prot: 1}\n", "unknown key api.prot"),
    ("bogus: {}\n", "unknown section 'bogus'"),
    ("api: {port: eighty}\n", "api.port: expected an integer"),
    ("api: {port: true}\n", "api.port: expected an integer"),
    ("engine: {kind: gpu}\n", "engine.kind: expected one of"),
    ("engine: {keep_alive: soon}\n", "engine.keep_alive"),
    ("p2p: {join: host}\n", "p2p.join: expected a list of strings"),
    ("api: [1, 2]\n", "api: expected a mapping"),
    ("api: {port: 1\n", "invalid YAML at line"),
    ("api: {port: 70000}\n", "api.port: expected a port"),
    ("engine: {kind: openai}\n", "engine.upstream"),
    ("models: {replication_bandwidth_mbps: -1}\n", "models.replication_bandwidth_mbps: expected an integer >= 0"),
    ("models: {replication_bandwidth_mbps: fast}\n", "models.replication_bandwidth_mbps: expected an integer"),
    ("logging: {access: loud}\n", "logging.access: expected one of info, debug"),
    ("engine: {prompt_cache_mib: -1}\n", "engine.prompt_cache_mib: expected an integer >= 0"),
    ("engine: {prompt_cache_mib: lots}\n", "engine.prompt_cache_mib: expected an integer"),
    ("p2p: {max_voters: 0}\n", "p2p.max_voters: expected an integer from 1 to 5"),
    ("p2p: {max_voters: 7}\n", "p2p.max_voters: expected an integer from 1 to 5"),
])
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, needle: str) -> None:
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        config.load(f, environ={})
    assert str(f) in str(e.value)
    assert needle in str(e.value)


def test_env_errors_say_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path / "ok.yaml", ""), environ={"OLLAMA_DISTRIBUTED_API_PORT": "x"})
    assert "environment: api.port: expected an integer" in str(e.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml", environ={})


def test_rendered_default_round_trips(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", config.render_default())
    assert config.validate_file(f).to_dict() == config.Config().to_dict()


def test_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = config.Config()
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/x")
    assert cfg.data_dir() == Path("/var/lib/x")
    cfg.node.data_dir = str(tmp_path)
    assert cfg.data_dir() == tmp_path

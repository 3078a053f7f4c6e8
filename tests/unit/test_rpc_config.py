"""engine.rpc_server / rpc_port / rpc_memory_mib: config and advert checks (issue 16)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from ollama_distributed import config
from ollama_distributed.cluster import advert
from ollama_distributed.engines import ggml_rpc
from ollama_distributed.errors import ConfigError, EngineError


def test_rpc_keys_default_off() -> None:
    cfg = config.Config()
    assert (cfg.engine.rpc_server, cfg.engine.rpc_port, cfg.engine.rpc_memory_mib) == (False, 0, 0)
    assert "rpc_server: false" in config.render_default()


def test_rpc_keys_from_yaml_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("engine: {rpc_server: true, rpc_port: 50052, rpc_memory_mib: 4096}\n")
    cfg = config.load(f, environ={})
    assert (cfg.engine.rpc_server, cfg.engine.rpc_port, cfg.engine.rpc_memory_mib) == (True, 50052, 4096)
    cfg = config.load(f, environ={"OLLAMA_DISTRIBUTED_ENGINE_RPC_SERVER": "false",
                                  "OLLAMA_DISTRIBUTED_ENGINE_RPC_MEMORY_MIB": "512"})
    assert (cfg.engine.rpc_server, cfg.engine.rpc_memory_mib) == (False, 512)


@pytest.mark.parametrize("text, needle", [
    ("engine: {rpc_server: 'maybe'}\n", "engine.rpc_server: expected a boolean"),
    ("engine: {rpc_port: 70000}\n", "engine.rpc_port: expected a port"),
    ("engine: {rpc_memory_mib: -1}\n", "engine.rpc_memory_mib: expected an integer >= 0"),
    ("engine: {rpc_memory_mib: 1.5}\n", "engine.rpc_memory_mib: expected an integer"),
])
def test_bad_rpc_values_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(f, environ={})
    assert needle in str(e.value) and str(f) in str(e.value)


def test_advert_rpc_fields_are_checked() -> None:
    ok = advert.check({"rpc_ready": True, "rpc_memory_mib": 2048})
    assert (ok["rpc_ready"], ok["rpc_memory_mib"]) == (True, 2048)
    # memory offered by a server that is not ready is no memory
    assert advert.check({"rpc_ready": False, "rpc_memory_mib": 2048})["rpc_memory_mib"] == 0
    # an advert from an older node has neither field, and gets none
    assert advert.check({"in_flight": 1}) == {"in_flight": 1, "queue_depth": 0, "max_queue": 0,
                                              "max_loaded_models": 0, "models": [], "loaded": [],
                                              "busy": [], "resources": {}}
    for bad, field in (({"rpc_ready": "yes"}, "rpc_ready"), ({"rpc_memory_mib": -5}, "rpc_memory_mib"),
                       ({"rpc_memory_mib": True}, "rpc_memory_mib"), ({"rpc_memory_mib": 2**62}, "rpc_memory_mib"),
                       ({"rpc_memory_mib": "1024"}, "rpc_memory_mib")):
        with pytest.raises(advert.BadAdvert) as e:
            advert.check(bad)
        assert e.value.field == field


def test_add_server_refuses_a_port_nobody_listens_on() -> None:
    # A closed port is an error here, not an abort of the process inside llama.cpp.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(EngineError, match="cannot be reached"):
            ggml_rpc.add_server(port)


def test_child_refuses_a_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ggml_rpc.main(["--port", "0"])
    assert "--port: expected 1-65535" in capsys.readouterr().err

"""Every environment variable the project reads, in one place."""

from __future__ import annotations

import os

CONFIG = "OLLAMA_DISTRIBUTED_CONFIG"
API = "OLLAMA_DISTRIBUTED_API"
CONFIG_PREFIX = "OLLAMA_DISTRIBUTED_"  # + SECTION_KEY, e.g. OLLAMA_DISTRIBUTED_API_PORT
STATE_DIRECTORY = "STATE_DIRECTORY"  # set by systemd's StateDirectory=
JOURNAL_STREAM = "JOURNAL_STREAM"
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
NO_COLOR = "NO_COLOR"


def get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None
API_TOKEN = "OLLAMA_DISTRIBUTED_API_TOKEN"  # bearer token the CLI sends
JOIN_TOKEN = "OLLAMA_DISTRIBUTED_TOKEN"  # join token for `start --join` (instead of --token, seen in ps)

"""Model names, following Ollama's rules: [host/][namespace/]model[:tag].

A name maps onto `manifests/<host>/<namespace>/<model>/<tag>` in the store, so
every part is checked against a strict pattern: nothing can climb out of the
store (`..`, absolute paths, NUL, separators inside a part).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadRequestError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,253}(:[0-9]{1,5})?$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")


@dataclass(frozen=True, order=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, raw: object) -> ModelName:
        if not isinstance(raw, str) or not raw.strip():
            raise BadRequestError("model name is required")
        name = raw.strip()
        if len(name) > 350 or "\x00" in name or "\\" in name or name.startswith("/"):
            raise BadRequestError(f"invalid model name {raw!r}")
        tag = DEFAULT_TAG
        path = name
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            path, tag = name[:colon], name[colon + 1 :]
        parts = path.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, (namespace, model) = DEFAULT_HOST, parts
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise BadRequestError(f"invalid model name {raw!r}: too many '/' parts")
        if not _HOST.match(host) or ".." in host:
            raise BadRequestError(f"invalid model name {raw!r}: bad host {host!r}")
        for part in (namespace, model):
            if not _PART.match(part) or ".." in part:
                raise BadRequestError(f"invalid model name {raw!r}: bad part {part!r}")
        if not _TAG.match(tag) or ".." in tag:
            raise BadRequestError(f"invalid model name {raw!r}: bad tag {tag!r}")
        return cls(host.lower(), namespace.lower(), model.lower(), tag.lower())

    @property
    def short(self) -> str:
        """How Ollama displays the name: defaults left out, tag always shown."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def path_parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return self.short


def parse(raw: object) -> ModelName:
    return ModelName.parse(raw)


_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def parse_digest(raw: object) -> str:
    """'sha256:<hex>' or 'sha256-<hex>' → the 64-char hex; anything else is a 400."""
    if not isinstance(raw, str):
        raise BadRequestError("digest must be a string like sha256:<64 hex digits>")
    m = _DIGEST.match(raw.strip())
    if not m:
        raise BadRequestError(f"invalid digest {raw!r}: expected sha256:<64 hex digits>")
    return m.group(1)

"""The error hierarchy shared by the API, the engines and the Rust core.

Each error carries the HTTP status the API answers with, so every path (local
engine, peer, scheduler) maps failures to the same status and body.
"""

from __future__ import annotations


class OllamaDistributedError(Exception):
    """Base class: `message` is what the client sees in {"error": ...}."""

    status = 500

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequestError(OllamaDistributedError):
    status = 400


class ModelNotFoundError(OllamaDistributedError):
    status = 404

    def __init__(self, model: str = "", status: int | None = None) -> None:
        # Ollama's own wording, which clients match on.
        msg = model if model.startswith("model ") else f"model '{model}' not found"
        super().__init__(msg, status)
        self.model = model


class NotFoundError(OllamaDistributedError):
    """Something other than a model is unknown (a node): 404."""

    status = 404


class OverloadedError(OllamaDistributedError):
    """Every slot and the queue are full: 503 with Retry-After."""

    status = 503
    retry_after = 1


class TenantLimitedError(OllamaDistributedError):
    """This tenant holds its share of the node's queue (scheduler.tenant_queue_share)
    while others are still admitted: 429 with Retry-After."""

    status = 429

    def __init__(self, message: str = "", status: int | None = None, retry_after: int = 1) -> None:
        super().__init__(message, status)
        self.retry_after = max(1, retry_after)


class DrainingError(OverloadedError):
    """This node is draining (SIGTERM or `cluster drain`) and a peer can take
    the request: its entry node retries it there, as for any 503."""


class PeerUnavailableError(OllamaDistributedError):
    """A peer could not take the request before any token was sent: retryable."""

    status = 502


class StreamTimeoutError(OllamaDistributedError):
    """A node gave no first chunk, or stopped sending mid-stream, within the
    scheduler's timeouts: 504 (retried on the next holder before the first chunk)."""

    status = 504


class DigestMismatchError(OllamaDistributedError):
    """Bytes from a peer or a registry are not the digest they were asked for."""

    status = 502


class EngineError(OllamaDistributedError):
    status = 500


class NotAvailableError(OllamaDistributedError):
    """A feature this build does not offer yet; says so instead of pretending."""

    status = 501


class ConflictError(OllamaDistributedError):
    """The request does not fit the cluster's state (a migration to a node that
    cannot hold the model, a catalogue that kept changing): 409."""

    status = 409


class CoreError(OllamaDistributedError, RuntimeError):
    """The Rust core could not do what was asked (no quorum, a stopped core, a
    failed cluster task): 503. Also a RuntimeError, which callers caught before."""

    status = 503


class BlobBusyError(CoreError):
    """The same blob is already being fetched by this node: try again shortly."""


class ConfigError(OllamaDistributedError):
    status = 500


def from_status(status: int, message: str) -> OllamaDistributedError:
    """Rebuild an error received from a peer or an upstream."""
    cls: type[OllamaDistributedError] = {
        400: BadRequestError,
        404: ModelNotFoundError,
        429: TenantLimitedError,
        501: NotAvailableError,
        502: PeerUnavailableError,
        503: OverloadedError,
        504: StreamTimeoutError,
    }.get(status, EngineError)
    if cls is ModelNotFoundError:
        return ModelNotFoundError(message, status)
    return cls(message, status)

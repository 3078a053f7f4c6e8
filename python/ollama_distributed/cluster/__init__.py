"""The cluster: membership, consensus and forwarding, run by the Rust core."""

from .service import ClusterService

__all__ = ["ClusterService"]

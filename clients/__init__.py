"""aekit clients: gRPC and REST clients for TF Serving, the `aekit client` CLI, figures, load generator.

    from clients import AutoencoderClient, RestAutoencoderClient

The clients are imported on first use (PEP 562), so the CLI's help stays instant.
"""

from clients.errors import ClientError

_LAZY = {"AutoencoderClient": "clients.grpc_client", "RestAutoencoderClient": "clients.rest_client"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")


__all__ = ["AutoencoderClient", "ClientError", "RestAutoencoderClient"]

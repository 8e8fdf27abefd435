"""sealgate: async Python client for a local sealgate daemon, with the opencomputer SDK's names.

::

    from sealgate import SecretStore, Sandbox

    store = await SecretStore.create(name="my-agent-secrets", egress_allowlist=["api.anthropic.com"])
    await SecretStore.set_secret(store["id"], "ANTHROPIC_API_KEY", "sk-ant-...",
                                 allowed_hosts=["api.anthropic.com"])
    sandbox = await Sandbox.create(secret_store="my-agent-secrets", timeout=600)
    result = await sandbox.commands.run("echo $ANTHROPIC_API_KEY")   # osb_sealed_…

Configuration: ``api_url`` / ``api_key`` keywords on every call, else ``SEALGATE_ADMIN_URL`` /
``SEALGATE_ADMIN_TOKEN``, else ``http://127.0.0.1:7070`` and ``data/admin.token``.
"""

from .errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SealgateConnectionError,
    SealgateError,
    SealgateHTTPError,
    UnauthorizedError,
)
from .sandbox import CommandResult, Commands, Sandbox
from .secret_store import UNSET, SecretStore

__all__ = [
    "SecretStore",
    "Sandbox",
    "Commands",
    "CommandResult",
    "SealgateError",
    "SealgateHTTPError",
    "NotFoundError",
    "ConflictError",
    "UnauthorizedError",
    "InvalidInputError",
    "SealgateConnectionError",
    "UNSET",
]

__version__ = "0.1.0"

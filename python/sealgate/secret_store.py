"""``SecretStore``: named stores of secrets and their egress allowlists (DESIGN §1, §4).

Every method is an async static method returning the REST API's JSON (dicts, lists of dicts) or
None, so code written for the opencomputer SDK runs unchanged::

    store = await SecretStore.create(name="my-agent-secrets", egress_allowlist=["api.anthropic.com"])
    await SecretStore.set_secret(store["id"], "ANTHROPIC_API_KEY", "sk-ant-…")

One difference, as in the daemon: ``egress_allowlist=None`` means *any public host* (on the
default ports, 443 and 80 for plain HTTP, as a pattern without a port), ``[]`` none.
Secret values go to the daemon once and are never returned by any method.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from . import _config, _http
from ._http import seg
from .errors import InvalidInputError, NotFoundError, gone


class _Unset:
    """Marks an argument that was not passed (distinct from an explicit None)."""

    _instance: Optional["_Unset"] = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: Default of ``SecretStore.update``'s fields: "leave unchanged".
UNSET: Any = _Unset()


def _secret_name(name: Any) -> None:
    """The daemon's rule for secret names (an environment-variable name, at most 128 bytes),
    checked before anything is sent: a value passed as the name by mistake
    (``set_secret(store, VALUE, NAME)``) would otherwise travel in the URL, which HTTP client
    logs print. The message never repeats the name."""
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= 128
        and name.isascii()
        and (name[0].isalpha() or name[0] == "_")
        and all(c.isalnum() or c == "_" for c in name)
    )
    if not ok:
        n = len(name) if isinstance(name, str) else 0
        raise InvalidInputError(
            "invalid_request",
            f"secret name ({n} characters, not repeated: it could be a value) must be an "
            "environment variable name: [A-Za-z_][A-Za-z0-9_]*, at most 128 characters",
        )
    if _looks_like_credential(name):
        raise InvalidInputError(
            "invalid_request",
            f"secret name ({len(name)} characters, not repeated) looks like a credential, not a "
            "variable name (a known token prefix, or a run of 24 or more mixed-case letters "
            "and digits): were the name and the value swapped? Names are variable names such "
            "as ANTHROPIC_API_KEY",
        )


#: Credential formats whose characters are all valid in a variable name (GitHub, Stripe, npm,
#: Hugging Face, DigitalOcean, Shopify),
#: each followed by 16 or more letters and digits of two kinds or more. The daemon applies the
#: same rule.
_CREDENTIAL_PREFIXES = (
    "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "sk_live_", "sk_test_", "rk_live_",
    "rk_test_", "npm_", "hf_", "dop_v1_", "shpat_", "shpss_", "shpca_",
)


def _looks_like_credential(name: str) -> bool:
    """The daemon's ``looks_like_credential``: a known token prefix followed by a run of 16 or
    more letters and digits of at least two kinds (lower case, upper case, digits), an AWS
    access key id, or a ``_``-separated run of 24 or more letters and digits with two or more
    each of lower case, upper case and digits."""
    for p in _CREDENTIAL_PREFIXES:
        if not name.startswith(p):
            continue
        run = re.match(r"[A-Za-z0-9]*", name[len(p):]).group(0)
        kinds = sum(
            any(f(c) for c in run) for f in (str.islower, str.isupper, str.isdigit)
        )
        if len(run) >= 16 and kinds >= 2:
            return True
    if name[:4] in ("AKIA", "ASIA"):
        rest = name[4:]
        if len(rest) == 16 and all(c.isupper() or c in "234567" for c in rest) and any(
            c.isdigit() for c in rest
        ):
            return True
    for run in name.split("_"):
        if (
            len(run) >= 24
            and run.isalnum()
            and sum(c.islower() for c in run) >= 2
            and sum(c.isupper() for c in run) >= 2
            and sum(c.isdigit() for c in run) >= 2
        ):
            return True
    return False


def _list(name: str, value: Optional[Sequence[str]]) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single string")
    return list(value)


class SecretStore:
    """Async static methods over ``/v1/stores``, with the opencomputer SDK's positional and
    keyword arguments. Every method accepts ``api_key`` and ``api_url`` (after its own
    arguments, in that order, as there; else ``SEALGATE_ADMIN_TOKEN`` / ``SEALGATE_ADMIN_URL``,
    else the CLI's local defaults)."""

    @staticmethod
    async def create(
        name: str,
        egress_allowlist: Optional[Sequence[str]] = None,
        api_key: Optional[str] = None,
        api_url: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Creates a store; returns ``{"id", "name", "egress_allowlist", "created_at",
        "updated_at"}``. ``ConflictError`` if the name is taken, ``InvalidInputError`` for an
        empty name or a bad host pattern."""
        body = {"name": name, "egress_allowlist": _list("egress_allowlist", egress_allowlist)}
        return await _http.call(_config.resolve(api_url, api_key), "POST", "/v1/stores", body)

    @staticmethod
    async def list(
        api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """Every store."""
        return await _http.call(_config.resolve(api_url, api_key), "GET", "/v1/stores")

    @staticmethod
    async def get(
        store_id: str, api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> Dict[str, Any]:
        """One store by id; ``NotFoundError`` if there is none."""
        cfg = _config.resolve(api_url, api_key)
        return await _http.call(cfg, "GET", f"/v1/stores/{seg(store_id)}")

    @staticmethod
    async def update(
        store_id: str,
        name: Any = UNSET,
        egress_allowlist: Any = UNSET,
        api_key: Optional[str] = None,
        api_url: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Changes only the fields passed: ``egress_allowlist=None`` makes the store
        unrestricted, omitting it leaves the allowlist as it is; ``name=""`` leaves the name
        as it is (as in the opencomputer SDK: no store has an empty name), and so does
        ``name=None``. Unlike the opencomputer SDK, where ``None`` means "unchanged", a
        ``None`` allowlist here opens the store to any public host (on the default ports). Returns the updated store,
        with the daemon's ``warnings`` added when the allowlist is made ``None`` (said first)
        and when the new allowlist leaves a secret never unsealed (e.g. ``None`` for a secret
        without ``allowed_hosts``)."""
        body: Dict[str, Any] = {}
        if name is not UNSET and name is not None and name != "":
            body["name"] = name
        if egress_allowlist is not UNSET:
            body["egress_allowlist"] = _list("egress_allowlist", egress_allowlist)
        cfg = _config.resolve(api_url, api_key)
        return await _http.call(cfg, "PATCH", f"/v1/stores/{seg(store_id)}", body)

    @staticmethod
    async def delete(
        store_id: str, api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> None:
        """Deletes the store and its secrets; running sandboxes keep their snapshot."""
        cfg = _config.resolve(api_url, api_key)
        await _http.call(cfg, "DELETE", f"/v1/stores/{seg(store_id)}")

    @staticmethod
    async def set_secret(
        store_id: str,
        name: str,
        value: str,
        allowed_hosts: Optional[Sequence[str]] = None,
        api_key: Optional[str] = None,
        api_url: Optional[str] = None,
        *,
        locations: Optional[Sequence[str]] = None,
    ) -> Dict[str, Any]:
        """Creates or replaces secret ``name`` (an env-var name). ``value`` is sent once and
        never returned or put into an exception. ``locations`` (keyword only: the opencomputer
        SDK's fifth argument is ``api_key``) is any of ``"header"``,
        ``"query"``, ``"body"`` (daemon default ``["header", "body"]``). Returns the secret's
        metadata (``name``, ``allowed_hosts``, ``locations``, timestamps, never the value) with
        the daemon's ``warnings`` (e.g. a secret that can never be unsealed, or a value short
        enough to be guessed)."""
        if not isinstance(value, str):
            raise TypeError(f"value must be a str, got {type(value).__name__}")
        _secret_name(name)
        body: Dict[str, Any] = {
            "value": value,
            "allowed_hosts": _list("allowed_hosts", allowed_hosts),
        }
        if locations is not None:
            body["locations"] = _list("locations", locations)
        cfg = _config.resolve(api_url, api_key)
        return await _http.call(cfg, "PUT", f"/v1/stores/{seg(store_id)}/secrets/{seg(name)}", body)

    @staticmethod
    async def list_secrets(
        store_id: str, api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> List[Dict[str, Any]]:
        """Secret metadata (``name``, ``allowed_hosts``, ``locations``, times), never values."""
        cfg = _config.resolve(api_url, api_key)
        return await _http.call(cfg, "GET", f"/v1/stores/{seg(store_id)}/secrets")

    @staticmethod
    async def delete_secret(
        store_id: str, name: str, api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> None:
        """Deletes one secret; its tokens stop working in running sandboxes within a second.
        A secret (or store) that is not there is not an error, as in the opencomputer SDK:
        afterwards it is not there either way. A 404 that is not the daemon's answer for a
        missing resource (a wrong ``api_url``: no such route, or another server) is raised."""
        _secret_name(name)
        cfg = _config.resolve(api_url, api_key)
        try:
            await _http.call(cfg, "DELETE", f"/v1/stores/{seg(store_id)}/secrets/{seg(name)}")
        except NotFoundError as e:
            if not gone(e):  # a wrong api_url ("no such route", another server) is an error
                raise

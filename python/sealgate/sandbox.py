"""``Sandbox``: a sealgate sandbox — sealed env, its own CA and, with ``isolation="netns"``, a
network namespace the daemon owns in which ``sandbox.commands.run`` executes ``sh -c cmd``.

::

    async with await Sandbox.create(secret_store="my-agent-secrets", timeout=600) as sandbox:
        result = await sandbox.commands.run("echo $ANTHROPIC_API_KEY")   # osb_sealed_…

A non-zero exit code is a result, not an exception; API failures raise ``SealgateError``.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from . import _config, _http, _sse
from ._config import Config
from ._http import seg
from .errors import NotFoundError, SealgateError, gone

def _whole_seconds(timeout: Any) -> Any:
    """The daemon takes whole seconds: ``600.0`` is sent as ``600`` and ``2.5`` as ``3`` (never
    less time than asked). Anything else (a bool, a string) goes as it is, for the daemon to
    refuse with its own message."""
    if isinstance(timeout, float) and math.isfinite(timeout):
        return math.ceil(timeout)
    return timeout


def _command_seconds(timeout: Any) -> Any:
    """A command's timeout as given (the commands API takes fractions: ``2.5`` stays 2.5),
    with ``60.0`` sent as ``60``; anything else goes as it is, for the daemon to refuse."""
    if isinstance(timeout, float) and math.isfinite(timeout) and timeout.is_integer():
        return int(timeout)
    return timeout


#: Seconds added to a command's own timeout for the HTTP call that carries it (the daemon
#: enforces the command timeout; this only bounds a daemon that stops answering).
HTTP_GRACE_SECS = 30.0

OutputCallback = Callable[[str], Any]


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left: its output (each stream capped by the daemon, then
    ``truncated``), its exit code, whether it was killed at its timeout, and whether the
    sandbox's memory limit killed a process while it ran (``oom_killed``; exit code 137)."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    truncated: bool = False
    duration_ms: Optional[int] = None
    oom_killed: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any], stdout: str = "", stderr: str = "") -> "CommandResult":
        """From the API's answer (``stdout``/``stderr`` default to what was streamed)."""
        code = data.get("exit_code")
        return cls(
            stdout=data.get("stdout", stdout),
            stderr=data.get("stderr", stderr),
            exit_code=-1 if code is None else int(code),
            timed_out=bool(data.get("timed_out", False)),
            truncated=bool(data.get("truncated", False)),
            duration_ms=data.get("duration_ms"),
            oom_killed=bool(data.get("oom_killed", False)),
        )


def _chunk_text(data: str) -> str:
    """The output carried by one ``stdout``/``stderr`` event: a JSON string, a JSON object with
    ``data``, or else the event's raw data."""
    try:
        value = json.loads(data)
    except ValueError:
        return data
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("data"), str):
        return value["data"]
    return data


async def _deliver(callback: Optional[OutputCallback], text: str) -> None:
    if callback is None:
        return
    out = callback(text)
    if inspect.isawaitable(out):
        await out


class Commands:
    """``sandbox.commands``: runs shell commands inside an isolated sandbox."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    async def run(
        self,
        cmd: Optional[str] = None,
        timeout: Optional[float] = 60,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        stdin: Optional[str] = None,
        *,
        command: Optional[str] = None,
    ) -> CommandResult:
        """Runs ``sh -c cmd`` in the sandbox and waits for it (at most ``timeout`` seconds, then
        it is killed and the result says ``timed_out``). ``env`` adds variables, ``cwd`` sets the
        directory (relative to the sandbox's home). ``timeout=None`` takes the daemon's default.
        With ``on_stdout``/``on_stderr`` the output is streamed and each callback
        (plain or async) gets every chunk as it arrives; the result still holds all of it.

        ``command=`` is the opencomputer SDK's name for ``cmd`` (give one of them).

        Raises ``ConflictError`` for a sandbox without ``netns`` isolation."""
        if (cmd is None) == (command is None):
            raise TypeError("run() takes the command once: as cmd (or positionally) or command=")
        body: Dict[str, Any] = {"cmd": cmd if cmd is not None else command}
        if timeout is not None:
            body["timeout"] = _command_seconds(timeout)
        if env is not None:
            body["env"] = dict(env)
        if cwd is not None:
            body["cwd"] = cwd
        if stdin is not None:
            body["stdin"] = stdin
        sbx = self._sandbox
        path = f"/v1/sandboxes/{seg(sbx.id)}/commands"
        http_timeout = None if timeout is None else float(timeout) + HTTP_GRACE_SECS
        if on_stdout is None and on_stderr is None:
            answer = await _http.call(sbx._cfg, "POST", path, body, timeout=http_timeout)
            return CommandResult.from_json(answer)
        return await self._stream(path, body, http_timeout, on_stdout, on_stderr)

    async def _stream(
        self,
        path: str,
        body: Dict[str, Any],
        http_timeout: Optional[float],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> CommandResult:
        out = {"stdout": [], "stderr": []}
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        cfg = self._sandbox._cfg
        async with _http.stream(cfg, "POST", path, body, timeout=http_timeout) as resp:
            async for ev in _sse.events(resp.aiter_text()):
                if ev.event in out:
                    text = _chunk_text(ev.data)
                    out[ev.event].append(text)
                    await _deliver(callbacks[ev.event], text)
                elif ev.event == "exit":
                    return CommandResult.from_json(
                        json.loads(ev.data), "".join(out["stdout"]), "".join(out["stderr"])
                    )
        raise SealgateError("bad_response", "the command stream ended without an exit event")


class Sandbox:
    """A live sandbox. Create with ``await Sandbox.create(...)`` or attach to an existing one
    with ``await Sandbox.connect(id)``; ``kill()`` (or leaving ``async with``) ends it."""

    def __init__(self, info: Dict[str, Any], cfg: Config) -> None:
        self.info: Dict[str, Any] = info
        self._cfg = cfg
        self.commands = Commands(self)
        #: The opencomputer SDK's newer name for ``commands``.
        self.exec = self.commands

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, secret_store_id={self.secret_store_id!r})"

    @property
    def id(self) -> str:
        """``sbx_…``."""
        return self.info["id"]

    @property
    def sandbox_id(self) -> str:
        """``id`` under the opencomputer SDK's name for it."""
        return self.id

    @property
    def env(self) -> Dict[str, str]:
        """The variables the sandbox's commands get from it: the ``envs`` it was created with
        and each secret as its sealed token (``osb_sealed_…``); the daemon refuses ``envs``
        (and a command's ``env``) naming a secret, so the two never clash."""
        return {**(self.info.get("envs") or {}), **(self.info.get("env") or {})}

    @property
    def envs(self) -> Dict[str, str]:
        """The plain variables given to ``Sandbox.create(envs=…)``."""
        return dict(self.info.get("envs") or {})

    @property
    def secret_store_id(self) -> Optional[str]:
        return self.info.get("secret_store_id")

    @property
    def expires_at(self) -> Optional[str]:
        return self.info.get("expires_at")

    @staticmethod
    async def create(
        secret_store: str,
        timeout: Optional[int] = None,
        envs: Optional[Mapping[str, str]] = None,
        isolation: str = "netns",
        *,
        template: Optional[str] = None,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> "Sandbox":
        """A new sandbox of store ``secret_store`` (name or id) living ``timeout`` seconds
        (daemon default when None). ``isolation="netns"`` (the default here) has the daemon run
        it in its own network namespace so ``commands.run`` works; ``"none"`` makes a proxy-only
        sandbox whose ``info["proxy_env"]`` the caller wires up. An isolated sandbox needs a
        daemon running as root (one that is not answers ``SealgateHTTPError`` 500
        ``isolation_failed`` saying so), and ends when the daemon stops: after a restart its id
        answers 404, where a proxy-only one is restored. ``envs`` are extra plain
        variables for its commands. ``NotFoundError`` for an unknown store. ``template`` is
        accepted so that opencomputer code (``Sandbox.create(template="base", …)``) runs
        unchanged, and ignored: every isolated sandbox runs the host's own userland."""
        del template
        body: Dict[str, Any] = {"secret_store": secret_store}
        if timeout is not None:
            body["timeout"] = _whole_seconds(timeout)
        if envs is not None:
            body["envs"] = dict(envs)
        if isolation != "none":  # "none" is the API default: omitted, older daemons accept it
            body["isolation"] = isolation
        cfg = _config.resolve(api_url, api_key)
        return Sandbox(await _http.call(cfg, "POST", "/v1/sandboxes", body), cfg)

    @staticmethod
    async def connect(
        sandbox_id: str, api_key: Optional[str] = None, api_url: Optional[str] = None
    ) -> "Sandbox":
        """The existing sandbox ``sandbox_id``; ``NotFoundError`` if it has ended. The
        arguments are the opencomputer SDK's, in its order."""
        cfg = _config.resolve(api_url, api_key)
        return Sandbox(await _http.call(cfg, "GET", f"/v1/sandboxes/{seg(sandbox_id)}"), cfg)

    async def is_running(self) -> bool:
        """True while the sandbox lives (the opencomputer SDK's check); False once it has
        ended. Other failures (a wrong ``api_url``, the daemon away) raise."""
        try:
            await self.refresh()
            return True
        except NotFoundError as e:
            if not gone(e):
                raise
            return False

    @staticmethod
    async def list(
        *, api_url: Optional[str] = None, api_key: Optional[str] = None
    ) -> "list[Dict[str, Any]]":
        """Every live sandbox of the daemon, as the API's dicts."""
        return await _http.call(_config.resolve(api_url, api_key), "GET", "/v1/sandboxes")

    async def refresh(self) -> Dict[str, Any]:
        """Re-reads the sandbox from the daemon (``NotFoundError`` once it has ended)."""
        fresh = await _http.call(self._cfg, "GET", f"/v1/sandboxes/{seg(self.id)}")
        self.info = {**self.info, **fresh}
        return self.info

    async def kill(self, delete_secret_store: bool = False) -> bool:
        """Ends the sandbox now: its tokens and CA stop working and, when isolated, its
        namespace, interfaces, rules and processes are removed. True if this call ended it,
        False if it had already ended (so calling it twice is harmless).

        ``delete_secret_store=True`` (as in the opencomputer SDK) also deletes the store the
        sandbox was made from, if it is still there: for single-use stores only, since other
        sandboxes of it keep just their snapshot."""
        try:
            await _http.call(self._cfg, "DELETE", f"/v1/sandboxes/{seg(self.id)}")
            ended = True
        except NotFoundError as e:
            if not gone(e):  # a wrong api_url is an error, not "already ended"
                raise
            ended = False
        store_id = self.secret_store_id
        if delete_secret_store and store_id:
            try:
                await _http.call(self._cfg, "DELETE", f"/v1/stores/{seg(store_id)}")
            except NotFoundError as e:
                if not gone(e):
                    raise
        return ended

    async def close(self) -> None:
        """Nothing to release (each call opens and closes its own connection); here so that
        opencomputer code ending with ``await sandbox.kill(); await sandbox.close()`` runs as
        it is. It does not end the sandbox: ``kill()`` does."""

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.kill()

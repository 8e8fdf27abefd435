"""The issue's (and README's) example, run verbatim — only the import differs from the
opencomputer SDK — with ``api.anthropic.com`` resolved to the local HTTPS echo origin."""

from __future__ import annotations

import json
import re

import pytest

from conftest import remember_secret
from sealgate import SecretStore, Sandbox

pytestmark = pytest.mark.anyio


async def test_readme_example_runs_unchanged(daemon, origin):
    remember_secret("sk-ant-...")
    before = len(origin.snapshot())

    # --- the example, verbatim ---------------------------------------------------------------
    store = await SecretStore.create(name='my-agent-secrets', egress_allowlist=['api.anthropic.com'])
    await SecretStore.set_secret(store['id'], 'ANTHROPIC_API_KEY', 'sk-ant-...', allowed_hosts=['api.anthropic.com'])
    sandbox = await Sandbox.create(secret_store='my-agent-secrets', timeout=600)
    result = await sandbox.commands.run('echo $ANTHROPIC_API_KEY')      # stdout: osb_sealed_…
    api_result = await sandbox.commands.run(
        'curl -s https://api.anthropic.com/v1/messages -H "x-api-key: $ANTHROPIC_API_KEY" ...')  # real key upstream
    # ------------------------------------------------------------------------------------------

    try:
        token = sandbox.env["ANTHROPIC_API_KEY"]
        assert re.fullmatch(r"osb_sealed_[0-9a-f]{32}", token)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == token + "\n"

        # the origin received the real key
        got = [r for r in origin.snapshot()[before:] if r.path == "/v1/messages"]
        assert len(got) == 1, f"origin saw {[(r.method, r.path) for r in origin.snapshot()[before:]]}"
        assert got[0].headers["x-api-key"] == "sk-ant-..."
        assert got[0].headers["host"] == "api.anthropic.com"

        # its echo came back with the key scrubbed to the sandbox's token. (curl's exit code is
        # not 0: the example's literal `...` is a second URL that does not resolve.)
        assert "sk-ant-..." not in api_result.stdout + api_result.stderr
        echoed = json.loads(api_result.stdout)
        assert echoed["path"] == "/v1/messages"
        assert echoed["headers"]["x-api-key"] == token
    finally:
        await sandbox.kill()

import asyncio, json, os, subprocess
from sealgate import SecretStore, Sandbox, NotFoundError
s = json.load(open("/tmp/h37c/logs/restart-state.json"))
async def main():
    for sid in (s["iso"], s["none"]):
        try:
            sb = await Sandbox.connect(sid); print("connect", sid, "ok; is_running", await sb.is_running(), "proxy_env" in sb.info)
        except NotFoundError as e:
            print("connect", sid, "NotFound", e)
    # proxy-only sandbox still substitutes after restart (same token, same CA)
    pe = s["none_info"]["proxy_env"]; env = dict(os.environ); env.update(pe)
    tok = s["none_info"]["env"]["K"]
    r = subprocess.run(["curl", "-s", "https://api.h37c.test/x", "-H", f"x-k: {tok}"], env=env, capture_output=True, text=True)
    print("proxy-only after restart:", r.stdout[:100], r.stderr[:200])
    await Sandbox.connect(s["none"]) and await (await Sandbox.connect(s["none"])).kill()
    await SecretStore.delete(s["store"])
asyncio.run(main())

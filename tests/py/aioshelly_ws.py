"""aioshelly (Home Assistant's Shelly library), run unchanged against a device over WebSocket.

usage: aioshelly_ws.py HOST PORT [--password P] [--wrong-password] [--cover]

Does what Home Assistant does at setup: GET /shelly (get_info), RpcDevice.create +
initialize (GetDeviceInfo, auth, GetConfig, GetStatus, GetComponents paged), then
reads the name, model, generation and firmware support; switches switch:0 on and waits
for the NotifyStatus that the library merges into its status; with --cover opens cover:0
and waits for it to move. With --wrong-password, expects InvalidAuthError from initialize.
Prints one JSON line per step; exits non-zero on any failure.
"""

import argparse
import asyncio
import json
import sys

import aiohttp
from aioshelly.common import ConnectionOptions, get_info
from aioshelly.const import RPC_GENERATIONS
from aioshelly.exceptions import InvalidAuthError
from aioshelly.rpc_device import RpcDevice, RpcUpdateType


def emit(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


async def wait_for(event: asyncio.Event, what: str, timeout: float = 10.0):
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise SystemExit(f"timed out waiting for {what}")


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--password")
    ap.add_argument("--wrong-password", action="store_true")
    ap.add_argument("--cover", action="store_true")
    a = ap.parse_args()

    async with aiohttp.ClientSession() as session:
        info = await get_info(session, a.host, port=a.port)
        emit("get_info", gen=info.get("gen"), model=info.get("model"), auth_en=info.get("auth_en"), mac=info.get("mac"))

        password = "not-" + (a.password or "") if a.wrong_password else a.password
        options = ConnectionOptions(a.host, "admin" if password else None, password, port=a.port)
        device = await RpcDevice.create(session, None, options)
        if a.wrong_password:
            try:
                await device.initialize()
            except InvalidAuthError as err:
                emit("invalid_auth", error=repr(err))
                await device.shutdown()
                return 0
            raise SystemExit("initialize accepted a wrong password")

        updates = []
        changed = asyncio.Event()

        def listener(dev, update_type):
            updates.append(update_type)
            if update_type == RpcUpdateType.STATUS:
                changed.set()

        device.subscribe_updates(listener)
        await device.initialize()
        emit(
            "initialized",
            initialized=device.initialized,
            name=device.name,
            model=device.model,
            gen=device.gen,
            firmware_supported=device.firmware_supported,
            requires_auth=device.requires_auth,
            components=sorted(k for k in device.status if ":" in k),
        )
        if not (device.initialized and device.firmware_supported and device.gen in RPC_GENERATIONS):
            raise SystemExit("the device was not accepted")

        methods = await device.methods_list()
        emit("methods", count=len(methods), has_switch_set="Switch.Set" in methods)

        if "switch:0" in device.status:
            changed.clear()
            await device.call_rpc("Switch.Set", {"id": 0, "on": True})
            while device.status["switch:0"]["output"] is not True:
                await wait_for(changed, "a NotifyStatus with switch:0 on")
                changed.clear()
            emit("switch_on_notified", output=device.status["switch:0"]["output"], apower=device.status["switch:0"].get("apower"))

        if a.cover:
            changed.clear()
            await device.cover_open(0)
            while device.status["cover:0"]["state"] != "opening":
                await wait_for(changed, "a NotifyStatus with cover:0 opening")
                changed.clear()
            emit("cover_opening", state=device.status["cover:0"]["state"])

        await device.shutdown()
        emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""aioshelly (Home Assistant's Shelly library), run unchanged against a device over WebSocket.

usage: aioshelly_ws.py HOST PORT [--password P] [--wrong-password [--attempts N]] [--cover]
                        [--watch SECONDS [--poll SECONDS] [--call-timeout SECONDS]]

Does what Home Assistant does at setup: GET /shelly (get_info), RpcDevice.create +
initialize (GetDeviceInfo, auth, GetConfig, GetStatus, GetComponents paged), then
reads the name, model, generation and firmware support; switches switch:0 on and waits
for the NotifyStatus that the library merges into its status; with --cover opens cover:0
and waits for it to move. With --wrong-password, expects InvalidAuthError from initialize
(--attempts N: tries N times and reports each error, as a client stuck in a retry loop).
With --watch, stays connected as Home Assistant does: polls Shelly.GetStatus every --poll
seconds (each call bounded by --call-timeout), reports every update it hears (events by
name, a dropped socket), and after a disconnect initializes again until the device answers.
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
    ap.add_argument("--attempts", type=int, default=1)
    ap.add_argument("--watch", type=float, default=0.0)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--call-timeout", type=float, default=10.0)
    a = ap.parse_args()

    async with aiohttp.ClientSession() as session:
        info = await get_info(session, a.host, port=a.port)
        emit("get_info", gen=info.get("gen"), model=info.get("model"), auth_en=info.get("auth_en"), mac=info.get("mac"))

        password = "not-" + (a.password or "") if a.wrong_password else a.password
        options = ConnectionOptions(a.host, "admin" if password else None, password, port=a.port)
        device = await RpcDevice.create(session, None, options)
        if a.wrong_password:
            for attempt in range(a.attempts):
                try:
                    await device.initialize()
                except InvalidAuthError as err:
                    emit("invalid_auth", attempt=attempt, error=repr(err))
                except Exception as err:  # noqa: BLE001 - what the client sees is the point
                    emit("init_error", attempt=attempt, error=f"{type(err).__name__}: {err}")
                else:
                    raise SystemExit("initialize accepted a wrong password")
            await device.shutdown()
            return 0

        updates = []
        changed = asyncio.Event()

        disconnected = asyncio.Event()

        def listener(dev, update_type):
            updates.append(update_type)
            if update_type == RpcUpdateType.STATUS:
                changed.set()
            if a.watch and update_type == RpcUpdateType.EVENT:
                for e in (dev.event or {}).get("events", []):
                    emit("event", component=e.get("component"), event=e.get("event"))
            if a.watch and update_type == RpcUpdateType.DISCONNECTED:
                emit("disconnected")
                disconnected.set()

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

        if a.watch:
            await watch(device, a, disconnected)

        await device.shutdown()
        emit("done")
    return 0


async def watch(device, a, disconnected: asyncio.Event):
    """Polls and reconnects as Home Assistant's coordinator does, for a.watch seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + a.watch
    while loop.time() < end:
        if disconnected.is_set():
            try:
                await device.initialize()
            except Exception as err:  # noqa: BLE001
                emit("reinit_error", error=type(err).__name__)
                await asyncio.sleep(a.poll)
                continue
            disconnected.clear()
            emit("reinitialized", uptime=device.status["sys"]["uptime"])
            continue
        try:
            status = await device.call_rpc("Shelly.GetStatus", timeout=a.call_timeout)
            emit("poll_ok", uptime=status["sys"]["uptime"])
        except Exception as err:  # noqa: BLE001
            emit("poll_error", error=f"{type(err).__name__}: {err}")
        await asyncio.sleep(a.poll)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

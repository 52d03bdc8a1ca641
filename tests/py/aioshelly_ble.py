"""aioshelly's BLE RPC (BleRPC through bleak and bleak-retry-connector), run unchanged.

usage: aioshelly_ble.py ADDRESS [--expect-error TEXT]

On the BlueZ of DBUS_SYSTEM_BUS_ADDRESS (the virtual air in CI): finds the device by
address, parses its advertisement's Shelly manufacturer data with aioshelly's own parser
(RPC-over-BLE flag, MAC, model id), then, as Home Assistant's BLE provisioning does,
creates an RpcDevice with the BLEDevice and calls Shelly.GetDeviceInfo, WiFi.Scan,
Switch.Set and Shelly.GetStatus (whose answer spans many reads at MTU 23).
With --expect-error, expects a call to fail with an exception containing TEXT.
Prints one JSON line per step; exits non-zero on any failure.
"""

import argparse
import asyncio
import json
import sys

from bleak import BleakScanner
from aioshelly.ble.manufacturer_data import has_rpc_over_ble, parse_shelly_manufacturer_data
from aioshelly.common import ConnectionOptions
from aioshelly.rpc_device import RpcDevice


def emit(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--expect-error")
    a = ap.parse_args()

    found = {}

    def seen(dev, adv):
        if dev.address.upper() == a.address.upper():
            found["dev"], found["adv"] = dev, adv

    async with BleakScanner(detection_callback=seen):
        for _ in range(100):
            if "dev" in found:
                break
            await asyncio.sleep(0.1)
    if "dev" not in found:
        raise SystemExit(f"{a.address} not found")
    adv = found["adv"]
    parsed = parse_shelly_manufacturer_data(adv.manufacturer_data)
    emit("advertisement", name=adv.local_name, rpc_over_ble=has_rpc_over_ble(adv.manufacturer_data), parsed=parsed)

    device = await RpcDevice.create(None, None, ConnectionOptions(ble_device=found["dev"]))
    rpc = device._rpc  # the transport Home Assistant's provisioning drives through call_rpc
    await rpc.connect()
    try:
        if a.expect_error:
            try:
                await device.call_rpc("Shelly.GetDeviceInfo")
            except Exception as err:  # noqa: BLE001 - the error is what is checked
                emit("error", error=f"{type(err).__name__}: {err}")
                if a.expect_error not in f"{type(err).__name__}: {err}":
                    raise SystemExit(f"expected {a.expect_error!r}")
                return 0
            raise SystemExit("the call succeeded")
        info = await device.call_rpc("Shelly.GetDeviceInfo")
        emit("device_info", id=info["id"], model=info["model"], gen=info["gen"], mac=info["mac"])
        scan = await device.call_rpc("WiFi.Scan")
        emit("wifi_scan", ssids=[r["ssid"] for r in scan["results"]])
        was = await device.call_rpc("Switch.Set", {"id": 0, "on": True})
        emit("switch_set", was_on=was["was_on"])
        status = await device.call_rpc("Shelly.GetStatus")
        emit("status", output=status["switch:0"]["output"], bytes=len(json.dumps(status)))
    finally:
        await rpc.disconnect()
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Scans with BlueZ discovery filters the way an app looking for one kind
of device does (bleak from PyPI, unmodified), and reports what it heard.

  --uuid U     only devices advertising this service (repeatable)
  --rssi N     only devices heard at N dBm or stronger
  --seconds S  how long to scan

Prints one JSON line: {"heard": [{"address", "name", "rssi"}, ...]}.
"""
import argparse
import asyncio
import json
import sys

from bleak import BleakScanner


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uuid", action="append", default=[])
    ap.add_argument("--rssi", type=int)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    filters = {"Transport": "le"}
    if a.uuid:
        filters["UUIDs"] = a.uuid
    if a.rssi is not None:
        filters["RSSI"] = a.rssi
    heard = {}

    def seen(dev, adv):
        heard[dev.address] = {"address": dev.address, "name": adv.local_name, "rssi": adv.rssi}

    async with BleakScanner(seen, service_uuids=a.uuid or None, bluez={"filters": filters}):
        await asyncio.sleep(a.seconds)
    print(json.dumps({"heard": sorted(heard.values(), key=lambda d: d["address"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

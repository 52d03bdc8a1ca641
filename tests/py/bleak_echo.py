"""bleak (unmodified, from PyPI) as the central on hilbench's virtual air.

Finds the echo peripheral by address (it is already advertising: a late
scanner), connects, subscribes to 0xFF01, writes without response to 0xFF02
and prints one JSON line with the notifications it got. With --rounds N it
also times N write→first-notification round trips.
"""
import argparse
import asyncio
import json
import sys
import time

from bleak import BleakClient, BleakScanner

NOTIFY = "0000ff01-0000-1000-8000-00805f9b34fb"
WRITE = "0000ff02-0000-1000-8000-00805f9b34fb"


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args()
    dev = await BleakScanner.find_device_by_address(a.address, timeout=a.timeout)
    if dev is None:
        print(json.dumps({"ok": False, "error": "not found"}))
        return 1
    q: asyncio.Queue = asyncio.Queue()
    async with BleakClient(dev, timeout=a.timeout) as c:
        await c.start_notify(NOTIFY, lambda _ch, data: q.put_nowait(bytes(data)))
        await c.write_gatt_char(WRITE, b"hi", response=False)
        notes = [await asyncio.wait_for(q.get(), a.timeout) for _ in range(2)]
        await c.write_gatt_char(WRITE, b"LONG", response=True)
        long_note = await asyncio.wait_for(q.get(), a.timeout)
        rtts = []
        for i in range(a.warmup + a.rounds):
            t0 = time.perf_counter()
            await c.write_gatt_char(WRITE, b"ab", response=False)
            await asyncio.wait_for(q.get(), a.timeout)
            rtt = (time.perf_counter() - t0) * 1e6
            await asyncio.wait_for(q.get(), a.timeout)
            if i >= a.warmup:
                rtts.append(rtt)
        mtu = c.mtu_size
        await c.stop_notify(NOTIFY)
    out = {
        "ok": True,
        "path": dev.details.get("path") if isinstance(dev.details, dict) else None,
        "name": dev.name,
        "notifications": [n.hex() for n in notes],
        "long": long_note.hex(),
        "mtu": mtu,
    }
    if rtts:
        rtts.sort()
        q = lambda f: rtts[min(len(rtts) - 1, int(len(rtts) * f))]
        out["rtt_us"] = {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": rtts[-1], "n": len(rtts)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Poll a JBD BMS with bleak the way the Home Assistant integrations do.

Scans for the BMS by address (or name), connects, subscribes to 0xFF01,
writes the 0x03 and 0x04 read requests WITHOUT response to 0xFF02,
reassembles the notifications by the frame's length byte, verifies the
checksum and prints one JSON line with the decoded values and the sizes of
the notifications each answer came in. Exit code 1 on any failure.
"""
import argparse
import asyncio
import json
import sys

from bleak import BleakClient, BleakScanner

NOTIFY = "0000ff01-0000-1000-8000-00805f9b34fb"
WRITE = "0000ff02-0000-1000-8000-00805f9b34fb"
READ_BASIC = bytes.fromhex("DDA50300FFFD77")
READ_CELLS = bytes.fromhex("DDA50400FFFC77")


class Reassembler:
    """Drops bytes until DD, waits for 4 + len + 3 bytes, checks the 77."""

    def __init__(self):
        self.buf = bytearray()

    def push(self, chunk: bytes):
        self.buf += chunk
        frames = []
        while True:
            while self.buf and self.buf[0] != 0xDD:
                del self.buf[0]
            if len(self.buf) < 4:
                return frames
            total = 4 + self.buf[3] + 3
            if len(self.buf) < total:
                return frames
            frame = bytes(self.buf[:total])
            del self.buf[:total]
            if frame[-1] != 0x77:
                continue
            frames.append(frame)


def checksum_ok(frame: bytes) -> bool:
    data = frame[2:-3]
    want = (0x10000 - sum(data)) & 0xFFFF
    return want == int.from_bytes(frame[-3:-1], "big")


def decode_basic(d: bytes) -> dict:
    ntc = d[22]
    return {
        "pack_v": int.from_bytes(d[0:2], "big") / 100,
        "current_a": int.from_bytes(d[2:4], "big", signed=True) / 100,
        "remaining_ah": int.from_bytes(d[4:6], "big") / 100,
        "capacity_ah": int.from_bytes(d[6:8], "big") / 100,
        "cycles": int.from_bytes(d[8:10], "big"),
        "protection": int.from_bytes(d[16:18], "big"),
        "soc_pct": d[19],
        "fet": d[20],
        "cell_count": d[21],
        "temps_c": [
            round((int.from_bytes(d[23 + 2 * i : 25 + 2 * i], "big") - 2731) / 10, 1)
            for i in range(ntc)
        ],
    }


async def request(client, queue, asm, req: bytes, timeout: float):
    # Drop anything left from an earlier answer.
    while not queue.empty():
        queue.get_nowait()
    await client.write_gatt_char(WRITE, req, response=False)
    sizes = []
    while True:
        chunk = await asyncio.wait_for(queue.get(), timeout)
        sizes.append(len(chunk))
        for frame in asm.push(chunk):
            if frame[1] != req[2]:
                continue
            if not checksum_ok(frame):
                raise ValueError(f"bad checksum in {frame.hex()}")
            if frame[2] != 0:
                raise ValueError(f"status 0x{frame[2]:02x}")
            return frame[4:-3], sizes


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address")
    ap.add_argument("--name")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--cycles", type=int, default=0,
                    help="benchmark: time this many full poll cycles (connect, subscribe, "
                         "0x03 + 0x04, disconnect) and print p50/p99 in ms instead of values")
    a = ap.parse_args()
    if a.cycles:
        return await bench(a)
    if a.address:
        dev = await BleakScanner.find_device_by_address(a.address, timeout=a.timeout)
    else:
        dev = await BleakScanner.find_device_by_name(a.name, timeout=a.timeout)
    if dev is None:
        print(json.dumps({"ok": False, "error": "not found"}))
        return 1
    queue: asyncio.Queue = asyncio.Queue()
    asm = Reassembler()
    async with BleakClient(dev, timeout=a.timeout) as client:
        await client.start_notify(NOTIFY, lambda _c, data: queue.put_nowait(bytes(data)))
        basic, basic_sizes = await request(client, queue, asm, READ_BASIC, a.timeout)
        cells, cell_sizes = await request(client, queue, asm, READ_CELLS, a.timeout)
        await client.stop_notify(NOTIFY)
    out = {"ok": True, "name": dev.name, "address": dev.address}
    out.update(decode_basic(basic))
    out["cells_mv"] = [int.from_bytes(cells[i : i + 2], "big") for i in range(0, len(cells) - 1, 2)]
    out["notification_sizes"] = {"basic": basic_sizes, "cells": cell_sizes}
    print(json.dumps(out))
    return 0


async def bench(a) -> int:
    """Times poll cycles from connect to disconnect. As Home Assistant's
    integrations do, it scans once and connects to the device BlueZ keeps
    cached; each connect waits until the BMS advertises again after the
    previous cycle let go (that wait is part of the cycle)."""
    import time

    dev = await BleakScanner.find_device_by_address(a.address, timeout=a.timeout)
    if dev is None:
        print(json.dumps({"ok": False, "error": "not found"}))
        return 1
    times = []
    for _ in range(a.cycles):
        t0 = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue()
        asm = Reassembler()
        async with BleakClient(dev, timeout=a.timeout) as client:
            await client.start_notify(NOTIFY, lambda _c, data: queue.put_nowait(bytes(data)))
            await request(client, queue, asm, READ_BASIC, a.timeout)
            await request(client, queue, asm, READ_CELLS, a.timeout)
            await client.stop_notify(NOTIFY)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(json.dumps({"ok": True, "cycles": len(times), "p50_ms": round(pick(0.5), 2),
                      "p99_ms": round(pick(0.99), 2), "max_ms": round(times[-1], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

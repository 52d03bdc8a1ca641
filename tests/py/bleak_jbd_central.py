"""A second BLE central for JBD scenarios, written with bleak (PyPI).

Modes (one per run):
  --hold S           connect, subscribe, keep the connection S seconds, disconnect
  --write HEX ...    connect, subscribe, write each request without response and
                     report the reassembled reply (or none) within --wait seconds,
                     --pause seconds apart
  --polls N          poll 0x03 N times, connecting and disconnecting each time,
                     retrying while the BMS cannot be found (another central holds it)

Prints one JSON line per event; exit code 0 when the mode ran to its end,
2 when the BMS was never found, 1 on any other failure.
"""
import argparse
import asyncio
import json
import sys
import time

from bleak import BleakClient, BleakScanner

NOTIFY = "0000ff01-0000-1000-8000-00805f9b34fb"
WRITE = "0000ff02-0000-1000-8000-00805f9b34fb"
READ_BASIC = bytes.fromhex("DDA50300FFFD77")


def say(**kv):
    print(json.dumps(kv), flush=True)


class Frames:
    """Drops bytes until DD, cuts frames by their length byte."""

    def __init__(self):
        self.buf = bytearray()
        self.frames = []
        self.event = asyncio.Event()

    def push(self, _sender, chunk: bytearray):
        self.buf += chunk
        while True:
            while self.buf and self.buf[0] != 0xDD:
                del self.buf[0]
            if len(self.buf) < 4 or len(self.buf) < 4 + self.buf[3] + 3:
                return
            total = 4 + self.buf[3] + 3
            self.frames.append(bytes(self.buf[:total]))
            del self.buf[:total]
            self.event.set()


async def find(address: str, timeout: float):
    return await BleakScanner.find_device_by_address(address, timeout=timeout)


async def session(address, find_timeout):
    dev = await find(address, find_timeout)
    if dev is None:
        return None, None
    client = BleakClient(dev)
    await client.connect()
    frames = Frames()
    await client.start_notify(NOTIFY, frames.push)
    return client, frames


async def hold(a):
    client, _ = await session(a.address, a.find_timeout)
    if client is None:
        say(event="not_found")
        return 2
    say(event="holding", seconds=a.hold)
    await asyncio.sleep(a.hold)
    await client.disconnect()
    say(event="released")
    return 0


async def write(a):
    """Each request gets up to 3 attempts: on one adapter other centrals share
    the link, and one of them disconnecting drops it for everyone."""
    client = frames = None
    for i, h in enumerate(a.write):
        if i and a.pause:
            await asyncio.sleep(a.pause)
        req = bytes.fromhex(h.replace(" ", ""))
        for attempt in range(3):
            try:
                if client is None or not client.is_connected:
                    client, frames = await session(a.address, a.find_timeout)
                    if client is None:
                        say(event="not_found")
                        return 2
                frames.frames.clear()
                frames.event.clear()
                await client.write_gatt_char(WRITE, req, response=False)
                try:
                    await asyncio.wait_for(frames.event.wait(), a.wait)
                    say(write=req.hex(), reply=frames.frames[0].hex())
                except asyncio.TimeoutError:
                    say(write=req.hex(), reply=None)
                break
            except Exception as e:  # link dropped under us: reconnect and retry
                say(event="retry", write=req.hex(), error=f"{type(e).__name__}: {e}")
                client = None
        else:
            return 1
    if client is not None and client.is_connected:
        await client.disconnect()
    return 0


async def polls(a):
    deadline = time.monotonic() + a.find_timeout
    done = 0
    while done < a.polls:
        if time.monotonic() > deadline:
            say(event="not_found", polls=done)
            return 2
        try:
            client, frames = await session(a.address, 1.0)
        except Exception as e:  # the other central dropped the shared link mid-connect
            say(event="retry", error=f"{type(e).__name__}: {e}")
            continue
        if client is None:
            continue
        try:
            await client.write_gatt_char(WRITE, READ_BASIC, response=False)
            await asyncio.wait_for(frames.event.wait(), a.wait)
            f = frames.frames[0]
            say(poll=done + 1, soc_pct=f[4 + 19], pack_v=int.from_bytes(f[4:6], "big") / 100)
            done += 1
        except Exception as e:
            say(event="retry", error=f"{type(e).__name__}: {e}")
            continue
        finally:
            try:
                await client.disconnect()
            except Exception:
                pass
        deadline = time.monotonic() + a.find_timeout
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--find-timeout", type=float, default=10.0)
    ap.add_argument("--wait", type=float, default=2.0)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between --write requests")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--hold", type=float)
    mode.add_argument("--write", nargs="+")
    mode.add_argument("--polls", type=int)
    a = ap.parse_args()
    try:
        if a.hold is not None:
            code = asyncio.run(hold(a))
        elif a.write:
            code = asyncio.run(write(a))
        else:
            code = asyncio.run(polls(a))
    except Exception as e:  # report, never hang
        say(event="error", error=f"{type(e).__name__}: {e}")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()

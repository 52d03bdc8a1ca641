"""bleak (unmodified) scanning hilbench's virtual air: one scan, timed until
it has heard `--count` distinct devices whose address starts with
`--prefix`. Prints one JSON line: how many it found and when (ms after
the scan was asked for), or that the timeout came first.
"""
import argparse
import asyncio
import json
import sys
import time

from bleak import BleakScanner


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--prefix", default="C0:DE:")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    seen: set = set()
    done = asyncio.Event()
    first_ms = None

    def heard(dev, _adv):
        nonlocal first_ms
        if dev.address.upper().startswith(a.prefix) and dev.address not in seen:
            seen.add(dev.address)
            if first_ms is None:
                first_ms = (time.perf_counter() - t0) * 1e3
            if len(seen) >= a.count:
                done.set()

    scanner = BleakScanner(detection_callback=heard)
    t0 = time.perf_counter()
    await scanner.start()
    started_ms = (time.perf_counter() - t0) * 1e3
    try:
        await asyncio.wait_for(done.wait(), a.timeout)
        ok = True
    except asyncio.TimeoutError:
        ok = False
    all_ms = (time.perf_counter() - t0) * 1e3
    await scanner.stop()
    print(json.dumps({"ok": ok, "found": len(seen), "start_ms": started_ms, "first_ms": first_ms, "all_ms": all_ms}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

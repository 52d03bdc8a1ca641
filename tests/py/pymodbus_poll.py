#!/usr/bin/env python3
"""Poll Modbus RTU devices with pymodbus: an independent master for hilbench.

Reads holding registers from each --address, --rounds times, with pymodbus's
synchronous ModbusSerialClient (RTU framer, 8N1, 9600 baud by default), and prints
one JSON object per read on stdout:

    {"address": 1, "ok": true, "registers": [...]}
    {"address": 1, "ok": false, "error": "<pymodbus's text>", "error_kind": "timeout",
     "error_class": "ModbusIOException"}

error_kind is one of:
    timeout    no byte came back on any attempt
    crc        a reply came back but its CRC was wrong (pymodbus drops such a frame
               silently and then reports the same "No response received" error as for
               a timeout; the kind is told apart from the bytes this script saw arrive)
    exception  the device sent a Modbus exception response; "exception_code" holds its code
    other      anything else (short or foreign reply, port error, wrong register count, ...)

Failed reads are data: the script exits 0 after all rounds (2 on bad arguments).
pymodbus's own log lines go to stderr (--log-level). --trace adds "round",
"elapsed_s" and the raw received bytes ("rx", hex per attempt) to every line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time

try:
    import pymodbus
    from pymodbus.client import ModbusSerialClient
    from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
except ImportError as err:  # pragma: no cover - environment problem
    sys.stderr.write(f"pymodbus_poll: cannot import pymodbus ({err}); pip install -r ci/requirements.txt\n")
    sys.exit(3)

try:
    from pymodbus import FramerType
except ImportError:  # pymodbus < 3.7
    FramerType = None

READ_HOLDING_REGISTERS = 0x03


def modbus_crc(data: bytes) -> bytes:
    """CRC-16/MODBUS of data, in wire order (low byte first)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


class RecordingSerialClient(ModbusSerialClient):
    """ModbusSerialClient that keeps the raw bytes received after each request sent.

    pymodbus reports a reply with a bad CRC exactly like no reply at all; the
    recorded bytes let the caller tell the two apart.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attempts: list[bytearray] = []

    def send(self, request, *args, **kwargs):
        if request:
            self.attempts.append(bytearray())
        return super().send(request, *args, **kwargs)

    def recv(self, size):
        data = super().recv(size)
        if data:
            if not self.attempts:
                self.attempts.append(bytearray())
            self.attempts[-1] += data
        return data


# pymodbus puts the client's class name into some error texts (e.g. "Failed to
# connect[ModbusSerialClient /dev/ttyX:0]"); keep them identical to a plain client's.
RecordingSerialClient.__name__ = RecordingSerialClient.__qualname__ = ModbusSerialClient.__name__


def classify_rx(attempts: list[bytearray], address: int) -> str:
    """error_kind for a read that pymodbus gave up on, from the bytes received."""
    received = [bytes(a) for a in attempts if a]
    if not received:
        return "timeout"
    for data in received:
        # Find a frame from the polled device and check it the way the framer does.
        for start in range(len(data)):
            if data[start] != address or len(data) - start < 5:
                continue
            func = data[start + 1]
            if func == READ_HOLDING_REGISTERS | 0x80:
                size = 5
            elif func == READ_HOLDING_REGISTERS:
                size = 3 + data[start + 2] + 2
            else:
                continue
            if len(data) - start < size:
                continue  # truncated
            frame = data[start : start + size]
            if modbus_crc(frame[:-2]) != frame[-2:]:
                return "crc"
    return "other"


def device_kwarg(client) -> str:
    """Name of the device-address keyword of read_holding_registers in this pymodbus."""
    params = inspect.signature(client.read_holding_registers).parameters
    for name in ("device_id", "slave", "unit"):  # 3.10+, 3.0-3.9, 2.x
        if name in params:
            return name
    raise RuntimeError(f"pymodbus {pymodbus.__version__}: no device address parameter in read_holding_registers{inspect.signature(client.read_holding_registers)}")


def make_client(args) -> RecordingSerialClient:
    kwargs = dict(
        baudrate=args.baudrate,
        bytesize=8,
        parity="N",
        stopbits=1,
        timeout=args.timeout,
        retries=args.retries,
    )
    if FramerType is not None:
        kwargs["framer"] = FramerType.RTU
    else:  # pragma: no cover - old pymodbus
        kwargs["method"] = "rtu"
    return RecordingSerialClient(args.port, **kwargs)


def failure(result: dict, err, kind: str) -> dict:
    """A failed read: pymodbus's text (str() of what it raised/returned), its class, our kind."""
    return {**result, "ok": False, "error": str(err), "error_kind": kind, "error_class": type(err).__name__}


def read_once(client, kwarg: str, address: int, args) -> dict:
    client.attempts = []
    result: dict = {"address": address}
    try:
        rr = client.read_holding_registers(args.start, count=args.count, **{kwarg: address})
    except ModbusIOException as err:
        rr = err
    except (ConnectionException, ModbusException, OSError, ValueError) as err:
        return failure(result, err, "other")

    if isinstance(rr, ModbusIOException):  # raised by 3.x sync clients; returned by some older ones
        return failure(result, rr, classify_rx(client.attempts, address))
    if rr.isError():
        code = getattr(rr, "exception_code", None)
        out = failure(result, rr, "exception" if code is not None else "other")
        if code is not None:
            out["exception_code"] = code
        return out
    registers = list(rr.registers)
    if len(registers) != args.count:
        return {
            **result,
            "ok": False,
            "error": f"expected {args.count} registers, got {len(registers)}: {registers}",
            "error_kind": "other",
            "error_class": "RegisterCountMismatch",
        }
    return {**result, "ok": True, "registers": registers}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", required=True, help="serial device, e.g. a PTY path")
    p.add_argument("--address", type=int, action="append", required=True, help="device address 1-247; repeat for several")
    p.add_argument("--count", type=int, default=47, help="registers per read (default 47)")
    p.add_argument("--start", type=int, default=0, help="first register address (default 0)")
    p.add_argument("--rounds", type=int, default=1, help="times to poll every address (default 1)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for a reply, per attempt (default 1.0)")
    p.add_argument("--retries", type=int, default=0, help="extra attempts after a failed one (default 0)")
    p.add_argument("--baudrate", type=int, default=9600, help="default 9600")
    p.add_argument("--interval", type=float, default=0.0, help="seconds to sleep between rounds (default 0)")
    p.add_argument("--log-level", default="WARNING", help="level of pymodbus's log on stderr (default WARNING)")
    p.add_argument("--trace", action="store_true", help="add round, elapsed_s and rx (received bytes) to each line")
    args = p.parse_args(argv)
    for a in args.address:
        if not 1 <= a <= 247:
            p.error(f"--address {a}: must be 1..247")
    if not 1 <= args.count <= 125:
        p.error("--count must be 1..125")
    if not 0 <= args.start <= 0xFFFF:
        p.error("--start must be 0..65535")
    if args.rounds < 0 or args.retries < 0 or args.timeout <= 0:
        p.error("--rounds and --retries must be >= 0, --timeout > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(args.log_level.upper())

    client = make_client(args)
    kwarg = device_kwarg(client)
    try:
        for rnd in range(args.rounds):
            if rnd and args.interval > 0:
                time.sleep(args.interval)
            for address in args.address:
                t0 = time.monotonic()
                line = read_once(client, kwarg, address, args)
                if args.trace:
                    line["round"] = rnd
                    line["elapsed_s"] = round(time.monotonic() - t0, 4)
                    line["rx"] = [bytes(a).hex() for a in client.attempts]
                print(json.dumps(line), flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A firmware update with smpclient (PyPI), unchanged, against an SMP server over UDP or serial:
params and echo, image state read, a multi-chunk upload, test, reset, confirm, reset, and
then a second update that is tested and not confirmed, so the next reset reverts it.
Prints one JSON line per step ({"step": ..., ...}) and exits 1 on the first failure.

usage: smp_dfu.py TARGET [IMAGE1 IMAGE2]
TARGET: HOST:PORT (UDP), serial:PATH (console framing), raw:PATH (raw serial, 384-byte MTU)
or ble:ADDRESS (BLE through bleak, on the BlueZ of DBUS_SYSTEM_BUS_ADDRESS).
Without images it builds two unsigned MCUboot images (2.0.0 and 3.0.0) itself.
"""

import asyncio
import hashlib
import json
import struct
import sys

from smpclient import SMPClient
from smpclient.generics import error, success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead, ResetWrite
from smpclient.transport.ble import SMPBLETransport
from smpclient.transport.serial import SMPSerialRawTransport, SMPSerialTransport
from smpclient.transport.udp import SMPUDPTransport


def mcuboot_image(major, body):
    """An unsigned MCUboot image: 0x200-byte header, body, TLV area with the SHA-256 TLV."""
    header = struct.pack("<IIHHIIBBHII", 0x96F3B83D, 0, 0x200, 0, len(body), 0, major, 0, 0, 0, 0)
    image = header + bytes(0x200 - len(header)) + body
    return image + struct.pack("<HHHH", 0x6907, 40, 0x10, 32) + hashlib.sha256(image).digest()


def say(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


def fail(step, why):
    say(step, ok=False, error=str(why))
    sys.exit(1)


async def ask(client, step, req):
    rsp = await client.request(req, timeout_s=5.0)
    if error(rsp):
        fail(step, rsp)
    if not success(rsp):
        fail(step, f"neither success nor error: {rsp!r}")
    return rsp


def slots(rsp):
    return [
        {"slot": i.slot, "version": i.version, "pending": bool(i.pending), "confirmed": bool(i.confirmed), "active": bool(i.active), "permanent": bool(i.permanent)}
        for i in rsp.images
    ]


async def connect(target):
    kind, _, where = target.partition(":")
    if kind == "serial":
        client = SMPClient(SMPSerialTransport(), where, timeout_s=1.0)
    elif kind == "raw":
        client = SMPClient(SMPSerialRawTransport(mtu=384), where, timeout_s=1.0)
    elif kind == "ble":
        client = SMPClient(SMPBLETransport(), where, timeout_s=10.0)
        await client.connect(10.0)
        return client
    else:
        host, port = target.rsplit(":", 1)
        transport = SMPUDPTransport()
        connect_on = transport.connect
        transport.connect = lambda address, timeout_s: connect_on(address, timeout_s, port=int(port))
        client = SMPClient(transport, host, timeout_s=1.0)
    await client.connect(1.0)
    return client


async def reset_and_wait(client, target):
    """Resets, waits until the device stops answering (it reboots 250 ms after its
    answer), then until smpclient can connect again (after its boot time)."""
    await ask(client, "reset", ResetWrite())
    for _ in range(50):
        try:
            await client.request(EchoWrite(d="still up?"), timeout_s=0.2)
            await asyncio.sleep(0.05)
        except Exception:
            break
    else:
        fail("reset", "the device kept answering for 10 s after the reset")
    try:
        await client.disconnect()
    except Exception:
        pass  # a BLE device that reset has dropped the link already
    for _ in range(50):
        try:
            return await connect(target)
        except Exception:
            await asyncio.sleep(0.1)
    fail("reconnect", "the device did not come back")


async def update(client, target, image, confirm):
    offsets = [off async for off in client.upload(image, first_timeout_s=10.0)]
    say("upload", ok=offsets[-1] == len(image), chunks=len(offsets))
    st = slots(await ask(client, "state_read", ImageStatesRead()))
    say("state_after_upload", slots=st)
    new_hash = (await ask(client, "state_read", ImageStatesRead())).images[1].hash
    st = slots(await ask(client, "test", ImageStatesWrite(hash=new_hash)))
    say("test", slots=st)
    client = await reset_and_wait(client, target)
    st = slots(await ask(client, "state_read", ImageStatesRead()))
    say("after_test_reset", slots=st)
    if confirm:
        st = slots(await ask(client, "confirm", ImageStatesWrite(confirm=True)))
        say("confirm", slots=st)
    client = await reset_and_wait(client, target)
    st = slots(await ask(client, "state_read", ImageStatesRead()))
    say("after_second_reset", slots=st)
    return client


async def main():
    target = sys.argv[1]
    if len(sys.argv) >= 4:
        first, second = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    else:
        first, second = mcuboot_image(2, b"\x5a" * 20000), mcuboot_image(3, b"\xa5" * 9000)
    client = await connect(target)
    p = await ask(client, "params", MCUMgrParametersRead())
    say("params", buf_size=p.buf_size, buf_count=p.buf_count)
    e = await ask(client, "echo", EchoWrite(d="hello smp"))
    say("echo", r=e.r)
    say("state_at_start", slots=slots(await ask(client, "state_read", ImageStatesRead())))
    client = await update(client, target, first, confirm=True)
    client = await update(client, target, second, confirm=False)
    await client.disconnect()
    say("done", ok=True)


if __name__ == "__main__":
    asyncio.run(main())

"""Echo requests of given sizes with smpclient (PyPI), unchanged, against an SMP server:
params first (as smpmgr does), then one echo per SIZE (characters of `d`), each with a 2 s
timeout. Prints one JSON line per step ({"step": ..., ...}); exits 1 on the first echo that
gets no answer or a wrong one.

usage: smp_echo.py TARGET SIZE [SIZE ...]
TARGET as for smp_dfu.py: HOST:PORT, serial:PATH or raw:PATH.
"""

import asyncio
import sys

from smpclient.generics import error, success
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead

from smp_dfu import ask, connect, fail, say


async def main():
    client = await connect(sys.argv[1])
    p = await ask(client, "params", MCUMgrParametersRead())
    say("params", buf_size=p.buf_size, buf_count=p.buf_count)
    for size in map(int, sys.argv[2:]):
        text = "e" * size
        try:
            rsp = await client.request(EchoWrite(d=text), timeout_s=2.0)
        except TimeoutError as e:
            fail("echo", f"{size} characters: no answer ({e.__class__.__name__})")
        if error(rsp) or not success(rsp):
            fail("echo", f"{size} characters: {rsp!r}")
        if rsp.r != text:
            fail("echo", f"{size} characters: answered {len(rsp.r)}")
        say("echo", size=size, ok=True)
    await client.disconnect()
    say("done", ok=True)


asyncio.run(main())

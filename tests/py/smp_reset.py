"""A reset with smpclient or mcumgr-toolkit (PyPI, unchanged), first as each sends it by
default, then forced: what each makes of a device whose application refuses a reset
that is not forced ({"rc": 10}, MGMT_ERR_EBUSY). Prints one JSON line per attempt.

usage: smp_reset.py smpclient|mcumgr-toolkit TARGET
TARGET: HOST:PORT (UDP) or serial:PATH.
"""

import asyncio
import json
import sys

import mcumgr_toolkit_dfu as toolkit
import smp_dfu
from smpclient.generics import error, success
from smpclient.requests.os_management import ResetWrite


def say(**kw):
    print(json.dumps(kw), flush=True)


async def with_smpclient(target):
    client = await smp_dfu.connect(target)
    for force in (None, 1):
        rsp = await client.request(ResetWrite(force=force), timeout_s=5.0)
        rc = getattr(rsp, "rc", None)
        say(client="smpclient", force=force, ok=bool(success(rsp)), error=bool(error(rsp)), rc=str(rc) if rc is not None else None)


def with_toolkit(target):
    client = toolkit.connect(target)
    for force in (False, True):
        try:
            client.os_system_reset(force=force)
            say(client="mcumgr-toolkit", force=force, ok=True)
        except Exception as e:  # the toolkit raises on an error answer
            say(client="mcumgr-toolkit", force=force, ok=False, error=f"{e.__class__.__name__}: {str(e)[:120]}")


def main():
    who, target = sys.argv[1], sys.argv[2]
    if who == "smpclient":
        asyncio.run(with_smpclient(target))
    else:
        with_toolkit(target)


if __name__ == "__main__":
    main()

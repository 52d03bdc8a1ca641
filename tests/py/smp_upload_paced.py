"""One image upload, paced like a slow link (a pause after every chunk), with smpclient or
mcumgr-toolkit, unchanged: what each does when an answer is lost or comes late mid-upload.
Prints the offsets the client reported and the secondary slot's version afterwards, as JSON
lines; exits 1 when the upload fails.

usage: smp_upload_paced.py smpclient|mcumgr-toolkit TARGET PAUSE_MS
       smp_upload_paced.py smpclient TARGET PAUSE_MS --erase-midway
TARGET: HOST:PORT (UDP) or serial:PATH. The image is a generated unsigned 2.0.0, 12,000 bytes.
--erase-midway: stop after two chunks, erase the slot (image erase), then upload the image again.
"""

import asyncio
import sys
import time

import mcumgr_toolkit_dfu as toolkit
import smp_dfu
from smpclient.requests.image_management import ImageErase, ImageStatesRead


async def with_smpclient(target, image, pause, erase_midway):
    client = await smp_dfu.connect(target)
    if erase_midway:
        first = []
        async for off in client.upload(image, first_timeout_s=10.0):
            first.append(off)
            if len(first) == 2:
                break
        await smp_dfu.ask(client, "erase", ImageErase())
        smp_dfu.say("erased", after_offsets=first)
    offsets = []
    try:
        async for off in client.upload(image, first_timeout_s=10.0, subsequent_timeout_s=1.0):
            offsets.append(off)
            await asyncio.sleep(pause)
    except Exception as e:  # smpclient raises on a timeout or an unexpected answer
        smp_dfu.fail("upload", f"{e.__class__.__name__}: {str(e)[:100]} after offsets {offsets}")
    smp_dfu.say("upload", ok=offsets[-1] == len(image), offsets=offsets)
    rsp = await smp_dfu.ask(client, "state_read", ImageStatesRead())
    smp_dfu.say("secondary", version=rsp.images[1].version if len(rsp.images) > 1 else None)


def with_toolkit(target, image, pause):
    client = toolkit.connect(target)
    client.set_timeout_ms(1000)
    offsets = []

    def progress(done, total):
        offsets.append(done)
        time.sleep(pause)

    toolkit.ask("upload", lambda: client.image_upload(image, progress=progress))
    toolkit.say("upload", ok=offsets[-1] == len(image), offsets=offsets)
    states = toolkit.ask("state_read", lambda: client.image_get_state())
    toolkit.say("secondary", version=next((s.version for s in states if s.slot == 1), None))


def main():
    who, target, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]) / 1000
    image = smp_dfu.mcuboot_image(2, bytes(i % 251 for i in range(12_000 - 0x200 - 40)))
    if who == "smpclient":
        asyncio.run(with_smpclient(target, image, pause, "--erase-midway" in sys.argv[4:]))
    else:
        with_toolkit(target, image, pause)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""An independent BACnet/SC peer for interoperability tests: rusty-bacnet
(PyPI, a Rust stack with Python bindings), pinned in ci/requirements.txt.

Three roles, each printing JSON lines on stdout:

  hub        a rusty-bacnet ScHub on --listen; prints one ready line
             {"event": "ready", "url": ...} and runs until killed.
  responder  a BACnet device (BACnetServer) on the hub at --hub: answers
             Who-Is with I-Am and ReadProperty with its Object_Name. Prints
             {"event": "connected", ...} once the hub accepted it, then runs
             until killed (or until --run-for seconds pass).
  initiator  a BACnet client on the hub: broadcasts Who-Is (destination
             VMAC FF*6) for --target-device until the I-Am arrives, then
             reads the target's Object_Name by unicast to --target-vmac.
             Prints "connected", "i-am" (with the VMAC the I-Am came from,
             which is the originating VMAC the hub inserted) and
             "read-property-ack"; exits 0 when both arrived.

The stack carries BACnet/SC over TLS 1.3 with mutual authentication only
(it has no plaintext mode), so every role takes the files of
`hilbench pki --out DIR` through --pki DIR (ca.pem, hub.pem/hub.key,
node-N.pem/node-N.key, N from --node).

A Connect-Request refused by the hub prints
{"event": "nak", "error_class": C, "error_code": E} as the peer decoded it
and exits 3. Any timeout prints {"event": "timeout", "waiting_for": ...}
and exits 2.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
import time

try:
    import rusty_bacnet as rb
except ImportError:  # the test that runs us says how to get it
    print(json.dumps({"event": "error", "error": "rusty_bacnet is not installed: run ci/test.sh "
                      "(it creates target/venv from ci/requirements.txt)"}), flush=True)
    sys.exit(4)


def emit(**fields):
    print(json.dumps(fields), flush=True)


def parse_vmac(text):
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise argparse.ArgumentTypeError(f"VMAC {text!r} is not 6 octets")
    return raw


def parse_uuid(text):
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise argparse.ArgumentTypeError(f"UUID {text!r} is not 16 octets")
    return raw


def vmac_text(raw):
    return raw.hex(":") if raw is not None else None


def default_uuid(vmac):
    # Stable per VMAC, so a restart is the same device (Annex AB: the UUID persists).
    return bytes.fromhex("5ca1ab1e00004000") + b"\x80\x00" + vmac


def package_version():
    try:
        from importlib.metadata import version
        return version("rusty-bacnet")
    except Exception:  # metadata missing only in odd installs; the version is informative
        return None


async def wait_until_killed(run_for):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=run_for)
    except asyncio.TimeoutError:
        pass


async def first_link_event(client, timeout):
    """The connector's first decisive event: connected, or a refusal."""
    events = await client.connection_events()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            ev = await asyncio.wait_for(events.__anext__(), timeout=left)
        except asyncio.TimeoutError:
            return None
        except StopAsyncIteration:
            return None
        if ev.kind in ("connected", "connect_failed", "disconnected", "reconnect_gave_up"):
            return ev


def report_link(ev, role, vmac):
    """Prints the link outcome; returns the exit code to use, or None when connected."""
    if ev is None:
        emit(event="timeout", role=role, waiting_for="connect-accept")
        return 2
    if ev.kind == "connected":
        emit(event="connected", role=role, vmac=vmac_text(vmac), hub_vmac=vmac_text(ev.hub_vmac))
        return None
    if ev.cause == "nak":
        emit(event="nak", role=role, vmac=vmac_text(vmac), error_class=ev.error_class,
             error_code=ev.error_code)
        return 3
    emit(event="link-failed", role=role, kind=ev.kind, cause=ev.cause, detail=ev.cause_detail,
         http_status=ev.http_status)
    return 5


def sc_files(args):
    d = args.pki.rstrip("/")
    return f"{d}/ca.pem", f"{d}/node-{args.node}.pem", f"{d}/node-{args.node}.key"


async def run_hub(args):
    d = args.pki.rstrip("/")
    hub = rb.ScHub(args.listen, f"{d}/hub.pem", f"{d}/hub.key", args.vmac, ca_cert=f"{d}/ca.pem",
                   device_uuid=args.uuid or default_uuid(args.vmac))
    await hub.start()
    emit(event="ready", url=await hub.url(), address=await hub.address(), peer="rusty-bacnet",
         version=package_version(), vmac=vmac_text(args.vmac))
    await wait_until_killed(args.run_for)
    await hub.stop()


async def run_responder(args):
    ca, cert, key = sc_files(args)
    server = rb.BACnetServer(args.device, args.name, transport="sc", sc_hub=args.hub,
                             sc_vmac=args.vmac, sc_ca_cert=ca, sc_client_cert=cert,
                             sc_client_key=key, sc_device_uuid=args.uuid or default_uuid(args.vmac))
    await server.start()
    # The server has no link-event API: being connected shows as the initiator's I-Am.
    emit(event="started", role="responder", vmac=vmac_text(args.vmac), device=args.device,
         name=args.name)
    await wait_until_killed(args.run_for)
    await server.stop()


async def run_initiator(args):
    ca, cert, key = sc_files(args)
    client = rb.BACnetClient(transport="sc", sc_hub=args.hub, sc_vmac=args.vmac, sc_ca_cert=ca,
                             sc_client_cert=cert, sc_client_key=key,
                             sc_device_uuid=args.uuid or default_uuid(args.vmac),
                             apdu_timeout_ms=int(args.timeout * 1000),
                             sc_connect_timeout_ms=int(args.timeout * 1000))
    try:
        await client.__aenter__()
    except rb.BacnetError as e:
        # A NAK to the first Connect-Request fails the start; the stack says
        # what it decoded only in the message, e.g. "... NAK during connect:
        # function=0x6 error_class=7 error_code=151 ...".
        m = re.search(r"NAK.*error_class=(\d+) error_code=(\d+)", str(e))
        if m:
            emit(event="nak", role="initiator", vmac=vmac_text(args.vmac),
                 error_class=int(m.group(1)), error_code=int(m.group(2)))
            return 3
        emit(event="link-failed", role="initiator", detail=str(e))
        return 5
    try:
        return await initiate(client, args)
    finally:
        await client.stop()


async def initiate(client, args):
    code = report_link(await first_link_event(client, args.timeout), "initiator", args.vmac)
    if code is not None:
        return code
    if args.connect_only:
        await wait_until_killed(args.run_for)
        return 0
    deadline = time.monotonic() + args.timeout
    found = None
    while found is None and time.monotonic() < deadline:
        # Who-Is goes to the local broadcast VMAC; the responder may not be up yet, so repeat.
        await client.who_is(args.target_device, args.target_device)
        for _ in range(10):
            found = await client.get_device(args.target_device)
            if found is not None:
                break
            await asyncio.sleep(0.1)
    if found is None:
        emit(event="timeout", role="initiator", waiting_for="i-am",
             target_device=args.target_device)
        return 2
    emit(event="i-am", device=found.object_identifier.instance,
         from_vmac=vmac_text(bytes(found.mac_address)), vendor_id=found.vendor_id,
         max_apdu=found.max_apdu_length)
    target = args.target_vmac or bytes(found.mac_address)
    try:
        value = await client.read_property(
            vmac_text(target), rb.ObjectIdentifier(rb.ObjectType.DEVICE, args.target_device),
            rb.PropertyIdentifier.OBJECT_NAME)
    except rb.BacnetTimeoutError:
        emit(event="timeout", role="initiator", waiting_for="read-property-ack",
             target_vmac=vmac_text(target))
        return 2
    emit(event="read-property-ack", from_vmac=vmac_text(target),
         object_name=getattr(value, "value", str(value)))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    for name in ("hub", "responder", "initiator"):
        s = sub.add_parser(name)
        s.add_argument("--pki", required=True, help="directory written by `hilbench pki`")
        s.add_argument("--vmac", type=parse_vmac, required=True, help="own VMAC, 6 hex octets")
        s.add_argument("--uuid", type=parse_uuid, help="Device UUID (default: derived from --vmac)")
        s.add_argument("--run-for", type=float, default=600.0,
                       help="seconds to stay up when not killed (bounded on purpose)")
        if name == "hub":
            s.add_argument("--listen", default="127.0.0.1:0")
        else:
            s.add_argument("--hub", required=True, help="wss:// URL of the hub")
            s.add_argument("--node", type=int, default=1, help="use node-N.pem/node-N.key")
            s.add_argument("--timeout", type=float, default=20.0)
        if name == "responder":
            s.add_argument("--device", type=int, required=True)
            s.add_argument("--name", default="rusty-bacnet responder")
        if name == "initiator":
            s.add_argument("--target-device", type=int, default=0)
            s.add_argument("--target-vmac", type=parse_vmac,
                           help="unicast target (default: the VMAC the I-Am came from)")
            s.add_argument("--connect-only", action="store_true",
                           help="connect, print the outcome, stay until killed")
    args = p.parse_args()
    run = {"hub": run_hub, "responder": run_responder, "initiator": run_initiator}[args.role]
    sys.exit(asyncio.run(run(args)) or 0)


if __name__ == "__main__":
    main()

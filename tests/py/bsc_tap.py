#!/usr/bin/env python3
"""A wire tap for BACnet/SC over mutual TLS: terminates the node's TLS with
the test hub certificate, dials the real hub with a test node certificate,
relays the bytes and prints every WebSocket frame it carries, both ways, as
JSON lines with the BVLC-SC header decoded and the raw hex. Standard library
only. It is an instrument for finding what a peer puts on the wire (byte
order, NAK codes, originating VMACs), not a BACnet/SC implementation: it
never builds or changes a BVLC message.

  bsc_tap.py --pki DIR --upstream wss://localhost:PORT [--node N]

Prints {"event": "ready", "url": "wss://localhost:P"} first, then one line
per frame: {"event": "frame", "dir": "node>hub"|"hub>node", "opcode": 2,
"hex": ..., "bvlc": {...}} and one per upgrade: {"event": "upgrade", ...}.
A permessage-deflate offer is removed from the upgrade request, so the hex
is the BVLC message itself. Runs until killed, at most --run-for seconds.
"""

import argparse
import asyncio
import json
import signal
import ssl
import struct
import urllib.parse

FUNCTIONS = {
    0: "BVLC-Result", 1: "Encapsulated-NPDU", 2: "Address-Resolution",
    3: "Address-Resolution-ACK", 4: "Advertisement", 5: "Advertisement-Solicitation",
    6: "Connect-Request", 7: "Connect-Accept", 8: "Disconnect-Request", 9: "Disconnect-ACK",
    10: "Heartbeat-Request", 11: "Heartbeat-ACK", 12: "Proprietary-Message",
}
MAX_FRAME = 1 << 20  # a tap for tests: anything larger is a fault worth stopping on


def emit(**fields):
    print(json.dumps(fields), flush=True)


def both_orders(raw):
    """A 2-octet field read big-endian (the standard) and little-endian."""
    if len(raw) < 2:
        return None
    return {"be": struct.unpack(">H", raw[:2])[0], "le": struct.unpack("<H", raw[:2])[0]}


def skip_options(buf, pos):
    """Returns (options, new position), options as [{type, must_understand, data}]."""
    opts = []
    while pos < len(buf):
        marker = buf[pos]
        pos += 1
        opt = {"type": marker & 0x1F, "must_understand": bool(marker & 0x40)}
        if marker & 0x20:
            if pos + 2 > len(buf):
                opt["truncated"] = True
                opts.append(opt)
                return opts, len(buf)
            n = struct.unpack(">H", buf[pos:pos + 2])[0]
            opt["data"] = buf[pos + 2:pos + 2 + n].hex()
            pos += 2 + n
        opts.append(opt)
        if not marker & 0x80:
            break
    return opts, pos


def decode_bvlc(buf):
    if len(buf) < 4:
        return {"short": True}
    fn, ctl = buf[0], buf[1]
    out = {"function": FUNCTIONS.get(fn, f"0x{fn:02x}"), "control": f"0x{ctl:02x}",
           "message_id": struct.unpack(">H", buf[2:4])[0]}
    pos = 4
    if ctl & 0x08:
        out["orig_vmac"] = buf[pos:pos + 6].hex(":")
        pos += 6
    if ctl & 0x04:
        out["dest_vmac"] = buf[pos:pos + 6].hex(":")
        pos += 6
    if ctl & 0x02:
        out["dest_options"], pos = skip_options(buf, pos)
    if ctl & 0x01:
        out["data_options"], pos = skip_options(buf, pos)
    body = buf[pos:]
    out["payload"] = body.hex()
    if fn in (6, 7) and len(body) >= 26:
        out["vmac"] = body[0:6].hex(":")
        out["uuid"] = body[6:22].hex()
        out["max_bvlc"] = both_orders(body[22:24])
        out["max_npdu"] = both_orders(body[24:26])
    elif fn == 4 and len(body) >= 6:
        out["hub_status"] = body[0]
        out["accept_direct"] = body[1]
        out["max_bvlc"] = both_orders(body[2:4])
        out["max_npdu"] = both_orders(body[4:6])
    elif fn == 0 and len(body) >= 2:
        out["for_function"] = FUNCTIONS.get(body[0], f"0x{body[0]:02x}")
        out["result"] = "NAK" if body[1] == 1 else "ACK" if body[1] == 0 else body[1]
        if body[1] == 1 and len(body) >= 7:
            out["header_marker"] = body[2]
            out["error_class"] = both_orders(body[3:5])
            out["error_code"] = both_orders(body[5:7])
            out["details"] = body[7:].decode("utf-8", "replace")
    return out


async def read_http_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > 16384:
        raise ValueError("HTTP head over 16 KiB")
    return head


def header_map(head):
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


async def pump_frames(reader, writer, direction):
    """Relays WebSocket frames verbatim and reports each one."""
    while True:
        hdr = await reader.readexactly(2)
        b0, b1 = hdr
        n = b1 & 0x7F
        ext = b""
        if n == 126:
            ext = await reader.readexactly(2)
            n = struct.unpack(">H", ext)[0]
        elif n == 127:
            ext = await reader.readexactly(8)
            n = struct.unpack(">Q", ext)[0]
        if n > MAX_FRAME:
            emit(event="error", dir=direction, error=f"frame of {n} octets")
            return
        mask = await reader.readexactly(4) if b1 & 0x80 else b""
        data = await reader.readexactly(n)
        writer.write(hdr + ext + mask + data)
        await writer.drain()
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        opcode = b0 & 0x0F
        rec = {"dir": direction, "opcode": opcode, "fin": bool(b0 & 0x80), "len": n}
        if opcode == 2:
            rec["hex"] = data.hex()
            rec["bvlc"] = decode_bvlc(data)
        elif opcode == 8:
            rec["close_code"] = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else None
            rec["hex"] = data.hex()
        else:
            rec["hex"] = data.hex()
        emit(event="frame", **rec)


async def handle(node_r, node_w, args, up_host, up_port, up_ctx):
    try:
        hub_r, hub_w = await asyncio.open_connection(up_host, up_port, ssl=up_ctx,
                                                     server_hostname=up_host)
    except (OSError, ssl.SSLError) as e:
        emit(event="error", error=f"upstream dial: {e}")
        node_w.close()
        return
    try:
        req = await read_http_head(node_r)
        first, fields = header_map(req)
        emit(event="upgrade", dir="node>hub", request=first,
             subprotocol=fields.get("sec-websocket-protocol"),
             extensions_offered=fields.get("sec-websocket-extensions"))
        kept = [l for l in req.decode("latin-1").split("\r\n")
                if not l.lower().startswith("sec-websocket-extensions:")]
        hub_w.write("\r\n".join(kept).encode("latin-1"))
        await hub_w.drain()
        resp = await read_http_head(hub_r)
        status, rfields = header_map(resp)
        emit(event="upgrade", dir="hub>node", status=status,
             subprotocol=rfields.get("sec-websocket-protocol"))
        node_w.write(resp)
        await node_w.drain()
        await asyncio.gather(pump_frames(node_r, hub_w, "node>hub"),
                             pump_frames(hub_r, node_w, "hub>node"))
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
        pass
    finally:
        emit(event="closed")
        for w in (node_w, hub_w):
            w.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pki", required=True)
    p.add_argument("--upstream", required=True, help="wss://host:port of the real hub")
    p.add_argument("--node", type=int, default=1, help="the tap dials with node-N.pem")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--run-for", type=float, default=600.0)
    args = p.parse_args()
    d = args.pki.rstrip("/")
    up = urllib.parse.urlsplit(args.upstream)
    down_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=f"{d}/ca.pem")
    down_ctx.load_cert_chain(f"{d}/hub.pem", f"{d}/hub.key")
    down_ctx.verify_mode = ssl.CERT_REQUIRED
    down_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    up_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=f"{d}/ca.pem")
    up_ctx.load_cert_chain(f"{d}/node-{args.node}.pem", f"{d}/node-{args.node}.key")
    up_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args, up.hostname, up.port, up_ctx),
        "127.0.0.1", args.listen_port, ssl=down_ctx)
    port = server.sockets[0].getsockname()[1]
    emit(event="ready", url=f"wss://localhost:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.run_for)
    except asyncio.TimeoutError:
        pass
    server.close()


if __name__ == "__main__":
    asyncio.run(main())

"""The file system, settings and shell groups with mcumgr-toolkit (PyPI wheel of the Rust crate
behind mcumgrctl), unchanged, against an SMP server that has a settings backend with an `app`
handler (`app/mode` stored as "eco") and the shell command `bms status`. One JSON line per step;
exits 1 on the first failure.

usage: mcumgr_toolkit_groups.py TARGET            files, settings and shell
       mcumgr_toolkit_groups.py TARGET --reset    a setting written, then reset, unsaved and saved
TARGET: HOST:PORT (UDP), serial:PATH (console framing) or raw:PATH (raw serial).
"""

import hashlib
import sys
import zlib

from mcumgr_toolkit_dfu import ask, connect, fail, reset_and_wait, say


def expect(step, got, want):
    if got != want:
        fail(step, f"got {got!r}, want {want!r}")
    say(step, ok=True, value=got if isinstance(got, (int, str, bool)) else repr(got)[:80])


def refused(step, f):
    try:
        f()
    except Exception as e:  # the toolkit raises RuntimeError naming the device's error
        say(step, ok=True, error=str(e).splitlines()[-1][-80:])
        return
    fail(step, "no error")


def files(c):
    data = bytes((i * 31 + 7) % 256 for i in range(5000))
    ask("fs upload", lambda: c.fs_file_upload("/lfs1/blob.bin", data))
    expect("fs status", ask("fs status", lambda: c.fs_file_status("/lfs1/blob.bin")).length, len(data))
    expect("fs download", ask("fs download", lambda: c.fs_file_download("/lfs1/blob.bin")), data)
    types = ask("fs types", lambda: c.fs_supported_checksum_types())
    expect("fs types", sorted(types.keys()), ["crc32", "sha256"])
    crc = ask("fs crc32", lambda: c.fs_file_checksum("/lfs1/blob.bin", "crc32"))
    # The device sends crc32 as a number; the toolkit hands it over as 4 big-endian bytes.
    expect("fs crc32", bytes(crc.output), zlib.crc32(data).to_bytes(4, "big"))
    sha = ask("fs sha256", lambda: c.fs_file_checksum("/lfs1/blob.bin", "sha256", 100, 1000))
    expect("fs sha256 of 1000 bytes at 100", (sha.length, bytes(sha.output)), (1000, hashlib.sha256(data[100:1100]).digest()))
    ask("fs close", lambda: c.fs_file_close())
    refused("fs status of a missing file", lambda: c.fs_file_status("/lfs1/none"))


def settings(c):
    expect("settings read", bytes(ask("settings read", lambda: c.settings_read("app/mode"))), b"eco")
    ask("settings write", lambda: c.settings_write("app/mode", b"boost"))
    expect("settings read back", bytes(ask("settings read back", lambda: c.settings_read("app/mode"))), b"boost")
    ask("settings save", lambda: c.settings_save())
    ask("settings commit", lambda: c.settings_commit())
    ask("settings load", lambda: c.settings_load())
    ask("settings delete", lambda: c.settings_delete("app/mode"))
    refused("settings read, no handler", lambda: c.settings_read("other/x"))


def shell(c):
    expect("shell kernel version", ask("shell", lambda: c.shell_execute(["kernel", "version"])), "\r\nZephyr version 4.4.0\r\n")
    expect("shell bms status", ask("shell", lambda: c.shell_execute(["bms", "status"])), "\r\nsoc 80%\r\n")


def settings_across_resets(c, target):
    """What users meet: a setting written over SMP is gone after a reset unless it was saved."""
    read = lambda: bytes(ask("settings read", lambda: c.settings_read("app/mode")))
    say("at start", value=read().decode())
    ask("settings write", lambda: c.settings_write("app/mode", b"boost"))
    say("written", value=read().decode())
    reset_and_wait(c, target)
    say("after a reset, not saved", value=read().decode())
    ask("settings write", lambda: c.settings_write("app/mode", b"boost"))
    ask("settings save", lambda: c.settings_save())
    reset_and_wait(c, target)
    say("after a reset, saved", value=read().decode())


def main():
    target = sys.argv[1]
    c = connect(target)
    if "--reset" in sys.argv[2:]:
        settings_across_resets(c, target)
    else:
        files(c)
        settings(c)
        shell(c)
    say("done", ok=True)


if __name__ == "__main__":
    main()

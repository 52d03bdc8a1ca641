"""A firmware update with mcumgr-toolkit (PyPI wheel of the Rust crate behind mcumgrctl), unchanged,
against an SMP server: the same steps and the same JSON lines as smp_dfu.py (params and echo, image
state read, a multi-chunk upload, test, reset, confirm, reset, then a second image tested and not
confirmed, which the next reset reverts), plus OS/app and bootloader info, task statistics, the
RTC, the enumeration and statistics groups. mcumgr-toolkit checks every answer's header strictly (group, command, op and length must match).
Exits 1 on the first failure.

usage: mcumgr_toolkit_dfu.py TARGET IMAGE1 IMAGE2
TARGET: HOST:PORT (UDP), serial:PATH (console framing) or raw:PATH (raw serial).
"""

import datetime
import json
import sys
import time

import mcumgr_toolkit


def say(step, **kw):
    print(json.dumps({"step": step, **kw}), flush=True)


def fail(step, why):
    say(step, ok=False, error=str(why))
    sys.exit(1)


def connect(target):
    kind, _, where = target.partition(":")
    if kind == "serial":
        client = mcumgr_toolkit.MCUmgrClient.serial(where, timeout_ms=2000)
    elif kind == "raw":
        client = mcumgr_toolkit.MCUmgrClient.raw_serial(where, timeout_ms=2000)
    else:
        host, port = target.rsplit(":", 1)
        client = mcumgr_toolkit.MCUmgrClient.udp(host, int(port), timeout_ms=2000)
    client.use_auto_frame_size()
    return client


def ask(step, f):
    try:
        return f()
    except Exception as e:  # the toolkit raises RuntimeError with its diagnostic
        fail(step, f"{e.__class__.__name__}: {e}")


def slots(states):
    return [
        {"slot": s.slot, "version": s.version, "pending": s.pending, "confirmed": s.confirmed, "active": s.active, "permanent": s.permanent}
        for s in states
    ]


def reset_and_wait(client, target):
    """Resets, waits until the device stops answering (it reboots 250 ms after its answer),
    then until it answers again (after its boot time). Probes go out with a short timeout and
    no retries, or a retry would outlast the reboot and hide it."""
    ask("reset", lambda: client.os_system_reset())
    client.set_timeout_ms(200)
    client.set_retries(0)
    for _ in range(50):
        try:
            client.check_connection()
            time.sleep(0.05)
        except Exception:
            break
    else:
        fail("reset", "the device kept answering for 10 s after the reset")
    # Once it is down, probe with a timeout a loaded machine cannot outlast: an answer that
    # comes after its probe timed out is read by the next probe, which then sees the wrong
    # sequence number, and so on for every probe after it. 1 s was outlasted once on a
    # loaded CI machine (raw serial: 50 probes, none answered in turn), so 2 s, and a pause
    # after a failed probe that lets a late answer arrive before the next probe goes out.
    client.set_timeout_ms(2000)
    for _ in range(40):
        try:
            client.check_connection()
            break
        except Exception:
            time.sleep(0.3)
    else:
        fail("reconnect", "the device did not come back")
    client.set_timeout_ms(2000)
    client.set_retries(2)
    return client


def update(client, target, image, confirm):
    offsets = []
    ask("upload", lambda: client.image_upload(image, progress=lambda done, total: offsets.append(done)))
    say("upload", ok=offsets[-1] == len(image), chunks=len(offsets))
    states = ask("state_read", lambda: client.image_get_state())
    say("state_after_upload", slots=slots(states))
    new_hash = next(s.hash for s in states if s.slot == 1)
    say("test", slots=slots(ask("test", lambda: client.image_set_state(hash=new_hash))))
    client = reset_and_wait(client, target)
    say("after_test_reset", slots=slots(ask("state_read", lambda: client.image_get_state())))
    if confirm:
        say("confirm", slots=slots(ask("confirm", lambda: client.image_set_state(confirm=True))))
    client = reset_and_wait(client, target)
    say("after_second_reset", slots=slots(ask("state_read", lambda: client.image_get_state())))
    return client


def main():
    target = sys.argv[1]
    first, second = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    client = connect(target)
    p = ask("params", lambda: client.os_mcumgr_parameters())
    say("params", buf_size=p.buf_size, buf_count=p.buf_count)
    say("echo", r=ask("echo", lambda: client.os_echo("hello smp")))
    say("app_info", output=ask("app_info", lambda: client.os_application_info(format="a")))
    say("bootloader", info=str(ask("bootloader", lambda: client.os_bootloader_info())))
    say("tasks", names=sorted(ask("tasks", lambda: client.os_task_statistics())))
    ids = ask("enum", lambda: client.enum_get_group_ids())
    one_by_one = [ask("enum", lambda i=i: client.enum_get_group_id(i)) for i in range(ask("enum", lambda: client.enum_get_group_count()))]
    details = [(d.group, d.name, d.handlers) for d in ask("enum", lambda: client.enum_get_group_details())]
    say("enum", ids=list(ids), one_by_one=list(one_by_one), details=details)
    groups = ask("stats", lambda: client.stats_list_groups())
    say("stats", groups=list(groups), data={g: dict(ask("stats", lambda g=g: client.stats_get_group_data(g))) for g in groups})
    when = datetime.datetime(2026, 12, 7, 6, 30, 0)
    ask("datetime_set", lambda: client.os_set_datetime(when))
    got = ask("datetime", lambda: client.os_get_datetime())
    say("datetime", ok=abs((got - when).total_seconds()) < 5, got=str(got))
    say("state_at_start", slots=slots(ask("state_read", lambda: client.image_get_state())))
    client = update(client, target, first, confirm=True)
    client = update(client, target, second, confirm=False)
    say("done", ok=True)


if __name__ == "__main__":
    main()

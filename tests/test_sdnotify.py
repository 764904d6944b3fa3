"""systemd integration without systemd: bind the NOTIFY_SOCKET datagram socket ourselves and read
what the daemon sends; the unit file's essentials; the supervisor's backoff policy."""
import configparser
import io
import os
import signal
import socket
import threading

import pytest

from fmplexd.progress import Progress, TerminalLine
from fmplexd.sdnotify import Notifier
from fmplexd.supervisor import BACKOFF_MAX_S, BACKOFF_MIN_S, restart_delay
from ipc.messages import Deploy, ListTasks
from testkit.launch import REPO, Daemon, short_tmpdir, wait_notify, write_spec


def read_all(sock: socket.socket, until: bytes, timeout_s: float) -> list[bytes]:
    return wait_notify(sock, until, timeout_s)


def test_notifier_protocol_and_watchdog_rate_limit():
    d = short_tmpdir()
    path = os.path.join(d, "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_environ(env)
    assert env == {}                                  # taken out: children cannot inherit them
    n(status="loading", extend_timeout_s=2.5)
    n(ready=True, status="serving")
    n(watchdog=True)
    n(watchdog=True)                                  # within 5 s of the first: not repeated
    n(stopping=True)
    sock.settimeout(2)
    got = [sock.recv(1024) for _ in range(4)]
    assert got == [b"STATUS=loading\nEXTEND_TIMEOUT_USEC=2500000\n", b"READY=1\nSTATUS=serving\n",
                   b"WATCHDOG=1\n", b"STOPPING=1\n"]
    sock.close()


def test_notifier_abstract_socket_and_foreign_watchdog_pid():
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"fmplex-test-{os.getpid()}"
    server.bind("\0" + name)
    n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000",
                               "WATCHDOG_PID": "1"})      # the watchdog is someone else's
    n(watchdog=True)
    n(ready=True)
    server.settimeout(2)
    assert server.recv(64) == b"READY=1\n"
    server.close()


def test_a_listener_that_stops_reading_never_blocks_the_notifier():
    """A full datagram queue drops updates: the daemon's loop sends STATUS= from its housekeeping,
    and a blocking send there once wedged fmplexd under a harness that read only READY=1."""
    d = short_tmpdir()
    path = os.path.join(d, "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    done = threading.Event()

    def flood():
        for i in range(5000):                         # far past the queue (max_dgram_qlen)
            n(status=f"tasks: {i} ready")
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(30), "the notifier blocked on a listener that does not read"
    sock.settimeout(2)
    assert sock.recv(64).startswith(b"STATUS=tasks: 0 ready")      # the early ones arrived
    sock.close()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_rate_limited_per_stage_and_drawn_only_on_a_terminal():
    sent, clock = [], [0.0]
    tty = Tty()
    p = Progress(lambda **kw: sent.append(kw), tty, clock=lambda: clock[0])
    p("loading a", stage="a", extend_timeout_s=120)
    for i in range(100):                              # a tight loop: only the first few get out
        clock[0] += 0.01
        p(f"loading a: {i}%", stage="a")
    p("loading b", stage="b")                         # a new stage is always told
    p.done("loaded 2")
    assert sent[0] == {"status": "loading a", "extend_timeout_s": 120}
    assert [kw["status"] for kw in sent[1:]] == ["loading a: 24%", "loading a: 49%",
                                                "loading a: 74%", "loading a: 99%", "loading b",
                                                "loaded 2"]
    assert tty.getvalue().endswith("\r\x1b[2Kloading b\r\x1b[2Kloaded 2\n")
    plain = io.StringIO()                             # not a terminal: nothing drawn
    q = Progress(lambda **kw: None, plain)
    q("x", stage="x")
    q.done("y")
    line = TerminalLine(plain)
    line.draw("z")
    line.end()
    assert plain.getvalue() == ""


def test_no_notify_socket_is_a_no_op():
    Notifier.from_environ({})(ready=True, status="x", watchdog=True)


def test_daemon_lifecycle_notices_and_watchdog(tiny_bert):
    d = Daemon(tiny_bert, env={"WATCHDOG_USEC": "400000"})
    try:
        d.start()
        notices = list(d.notices)
        first = notices[0]
        assert b"EXTEND_TIMEOUT_USEC=" in first and b"STATUS=loading backbone default" in first
        assert any(b"READY=1" in n and b"STATUS=serving" in n for n in notices)
        statuses = [n.split(b"STATUS=")[1].split(b"\n")[0].decode() for n in notices
                    if b"STATUS=" in n]
        assert statuses[0] == "loading backbone default (1/1)", statuses     # then its stages,
        assert statuses[-3:] == ["warming up the executors", "loaded 1 backbone(s)",  # at most
                                 "serving 1 backbone(s)"], statuses                   # 4 a second
        assert all(s.startswith("loading backbone default (1/1)") for s in statuses[:-3])
        beats = 0
        while beats < 3:                              # WATCHDOG=1 at half of WATCHDOG_USEC
            beats += sum(b"WATCHDOG=1" in n for n in read_all(d.notify, b"WATCHDOG=1", 5))
        specs = short_tmpdir("fmx-sd-")
        path = write_spec(specs, "t", 'pipeline = "text-embedding"')
        with d.client() as c:
            with open(path) as f:
                c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=60)
            pid = {t.name: t.pid for t in c.control(ListTasks(ref=c.ref())).tasks}["t"]
        # While serving, STATUS= follows the tasks (deploying many shows as it goes).
        assert any(b"STATUS=serving 1 backbone(s); tasks: 1 ready\n" in n
                   for n in read_all(d.notify, b"tasks: 1 ready", 10))
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for v in environ)
        d.proc.send_signal(signal.SIGTERM)
        assert any(b"STOPPING=1" in n for n in read_all(d.notify, b"STOPPING=1", 10))
        assert d.proc.wait(30) == 0
    finally:
        d.cleanup()


def test_unit_file_is_type_notify_with_watchdog():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(os.path.join(REPO, "packaging", "fmplexd.service"))
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert "fmplexd" in svc["ExecStart"] and int(svc["WatchdogSec"]) > 0
    assert svc["RuntimeDirectory"] == "fmplex" and svc["KillSignal"] == "SIGTERM"


@pytest.mark.parametrize("deaths,delay", [(1, BACKOFF_MIN_S), (2, 2 * BACKOFF_MIN_S),
                                          (3, 4 * BACKOFF_MIN_S), (50, BACKOFF_MAX_S)])
def test_restart_backoff_doubles_up_to_its_cap(deaths, delay):
    assert restart_delay(deaths) == pytest.approx(delay)

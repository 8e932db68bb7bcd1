"""``make serve``'s supervisor stops everything it started, whatever signal comes, whenever it comes,
and nothing it started outlives it, even when it is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import requests

from config.settings import child_environment
from service import demo
from tests.support import ROOT, mlflow_server, running, serve_demo, stop


def harness(tmp_path, body):
    """Run ``body`` (Python, with ``demo`` imported) in a process of its own; return it and its pid file."""
    pids = tmp_path / "pids"
    code = "import os, signal, subprocess, sys, time\nfrom service import demo\n" + textwrap.dedent(body)
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(pids)], cwd=ROOT, env=child_environment({"PYTHONUNBUFFERED": "1"}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    return process, pids


def wait_for_pids(path, count=1, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(line) for line in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.05)
    raise AssertionError(f"no pids in {path}")


def wait_until_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running(pids)


def test_a_signal_while_the_child_is_forked_and_execd_still_stops_it(tmp_path):
    # SIGTERM arrives after fork and exec, before Popen has returned the process to the supervisor.
    process, pids = harness(tmp_path, """
        class Late(subprocess.Popen):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                open(sys.argv[1], "w").write(f"{self.pid}\\n")
                os.kill(os.getpid(), signal.SIGTERM)

        demo.subprocess.Popen = Late
        with demo.Supervisor() as children:
            children.start(["sleep", "300"])
            time.sleep(60)
    """)
    try:
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, process.stdout.read()
        assert wait_until_gone(wait_for_pids(pids), 10) == []
    finally:
        stop(process)


def test_stop_stops_the_group_when_its_leader_has_exited(tmp_path):
    # As a gunicorn master that died on its own leaves its workers.
    started = []
    leader = demo.start_child(["sh", "-c", f"sleep 300 & echo $! > {tmp_path / 'pid'}; exit 0"], started)
    leader.wait(timeout=10)
    (worker,) = wait_for_pids(tmp_path / "pid")
    assert running([worker]) == [worker]
    demo.stop(leader)
    assert running([worker]) == []


def test_a_second_signal_while_stopping_does_not_skip_the_final_kill(tmp_path):
    # The child ignores SIGTERM; make forwards the SIGTERM the supervisor already got.
    process, pids = harness(tmp_path, """
        with demo.Supervisor(stop_timeout=3) as children:
            child = children.start([sys.executable, "-c", "import signal, time; "
                                    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
            open(sys.argv[1], "w").write(f"{child.pid}\\n")
            time.sleep(300)
    """)
    try:
        (child,) = wait_for_pids(pids)
        time.sleep(1)  # the child has set its handler
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(0.5)  # the supervisor now waits for the child to stop
        os.kill(process.pid, signal.SIGTERM)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert running([child]) == []
    finally:
        stop(process)


def test_children_die_with_a_supervisor_killed_by_sigkill(tmp_path):
    process, pids = harness(tmp_path, """
        with demo.Supervisor() as children:
            child = children.start(["sleep", "300"])
            open(sys.argv[1], "w").write(f"{child.pid}\\n")
            time.sleep(300)
    """)
    try:
        (child,) = wait_for_pids(pids)
        process.kill()
        process.wait(timeout=10)
        assert wait_until_gone([child], 10) == []
    finally:
        stop(process)


# -- the real thing: the demo's tracking server and gunicorn ----------------------------------------


def descendants(pid):
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def commands(pids):
    found = {}
    for pid in pids:
        try:
            found[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            pass
    return found


def wait_for_moment(served, moment, timeout=300):
    """Wait until the supervisor reaches ``moment``; return the processes it has started by then."""
    deadline = time.monotonic() + timeout
    seen = set()
    while time.monotonic() < deadline:
        assert served.process.poll() is None, served.log()
        seen |= descendants(served.process.pid)
        started = " ".join(commands(seen).values())
        if moment == "tracking server starting" and "mlflow server" in started:
            return seen
        if moment == "gunicorn starting" and "gunicorn" in started:
            return seen
        if moment == "serving":
            try:
                if requests.get(served.url + "/health/ready", timeout=2).status_code == 200:
                    return seen | descendants(served.process.pid)
            except requests.RequestException:
                pass
        time.sleep(0.02 if moment != "serving" else 0.3)
    raise AssertionError(f"never reached {moment!r}:\n{served.log()}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "sig", "target"),
    [
        ("tracking server starting", signal.SIGINT, "group"),
        ("tracking server starting", signal.SIGTERM, "supervisor"),
        ("gunicorn starting", signal.SIGTERM, "group, then the supervisor again (as make forwards it)"),
        ("gunicorn starting", signal.SIGKILL, "supervisor"),
        ("serving", signal.SIGINT, "group"),
        ("serving", signal.SIGTERM, "supervisor"),
        ("serving", signal.SIGKILL, "supervisor"),
        ("serving", signal.SIGHUP, "group"),  # a closed terminal
    ],
)
def test_the_demo_leaves_no_process_and_no_port_behind(demo_store, tmp_path, moment, sig, target):
    with serve_demo(demo_store, tmp_path) as served:
        started = wait_for_moment(served, moment)
        supervisor = served.process.pid
        if target.startswith("group"):
            os.killpg(supervisor, sig)
        if target != "group":
            os.kill(supervisor, sig)
        status = served.process.wait(timeout=120)
        started |= descendants(supervisor)
        left = wait_until_gone(started, 60)
        assert left == [], f"still running after {sig.name}: {commands(left)}\n{served.log()}"
    assert status == (-sig if sig == signal.SIGKILL else 130 if sig == signal.SIGINT else 128 + sig), served.log()
    assert not demo.port_in_use("127.0.0.1", served.port), served.log()
    assert not demo.port_in_use("127.0.0.1", served.mlflow_port), served.log()
    assert "Traceback" not in served.log()


@pytest.mark.slow
def test_a_tracking_server_already_running_is_left_running_and_the_demo_says_so(demo_store, tmp_path):
    with mlflow_server(demo_store) as url:
        port = int(url.rsplit(":", 1)[1])
        with serve_demo(demo_store, tmp_path, mlflow_port=port) as served:
            started = wait_for_moment(served, "serving")
            os.killpg(served.process.pid, signal.SIGINT)
            assert served.process.wait(timeout=120) == 130, served.log()
            assert wait_until_gone(started, 60) == [], commands(started)
        assert "Ctrl-C stops the service; the tracking server, started elsewhere, keeps running" in served.log()
        assert "stops the service and the tracking server" not in served.log()
        assert demo.tracking_server_answers(url)


@pytest.mark.parametrize("group", ["gone already", "not ours to signal"])
def test_stop_ends_a_child_whose_group_is_gone_or_cannot_be_signalled(group, monkeypatch):
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    if group == "gone already":
        process.kill()
        process.wait()  # reaped: its process group is empty
    else:
        def refused(pgid, signum):  # what killpg says for a member run by another user (or, on macOS, zombies only)
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "killpg", refused)
    started = time.monotonic()
    demo.stop(process, timeout=5)
    assert process.returncode is not None and not running([process.pid])
    assert time.monotonic() - started < 5, "the child itself was stopped, not waited out"

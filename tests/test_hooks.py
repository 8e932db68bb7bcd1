"""What gunicorn's hooks call, without gunicorn: the metrics directory across reloads, one-line
errors, rolling back a version whose workers cannot start."""

import os
import signal
from types import SimpleNamespace

from config import metrics_dir
from service import hooks
from service.hooks import one_line
from service.registry import EXTENSION, ModelRegistry, Outcome
from tests.support import write_template_checkpoint


def test_a_configured_metrics_directory_is_emptied_of_old_metric_files_only(tmp_path):
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("keep me")
    environ = {}

    assert metrics_dir.prepare(str(tmp_path), environ, pid=100) == str(tmp_path)

    assert not (tmp_path / "counter_1.db").exists() and (tmp_path / "notes.txt").exists()
    assert environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)


def test_a_reload_of_the_same_master_keeps_the_live_metric_files(tmp_path):
    environ = {}
    metrics_dir.prepare(str(tmp_path), environ, pid=100)
    (tmp_path / "counter_200.db").write_bytes(b"a worker's counts")

    # gunicorn reads its config file again on SIGHUP, in the same master process.
    assert metrics_dir.prepare(None, environ, pid=100) == str(tmp_path)

    assert (tmp_path / "counter_200.db").exists()


def test_without_a_configured_directory_each_master_gets_its_own(tmp_path):
    first, second = {}, {}
    made = metrics_dir.prepare(None, first, pid=100)
    try:
        assert os.path.isdir(made) and first["PROMETHEUS_MULTIPROC_DIR"] == made
        # A new master (a re-exec inherits the environment) starts from a clean directory.
        second.update(first)
        (open(os.path.join(made, "counter_1.db"), "wb")).close()
        assert metrics_dir.prepare(made, second, pid=200) == made
        assert not os.path.exists(os.path.join(made, "counter_1.db"))
    finally:
        os.rmdir(made)


def test_start_up_errors_are_one_printable_line():
    assert one_line("bad\nthing\x00 here\t now") == "bad thing\\x00 here now"


def test_quicker_access_lines_are_the_lines_gunicorn_writes(monkeypatch):
    import datetime
    import logging

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from service.hooks import quicker_access_lines

    config = Config()
    config.set("accesslog", "-")
    config.set(
        "access_log_format",
        '%(h)s "%(r)s" %(s)s %(b)s %(M)sms %(a)s %({x-request-id}o)s %({X-Trace}i)s %({missing}i)s %(p)s %(D)s',
    )

    class Response:
        status, sent = "200 OK", 88
        headers = [("Content-Type", "application/json"), ("X-Request-ID", 'id-"quoted"')]

    class Request:
        headers = [("X-TRACE", 'say "hi"'), ("USER-AGENT", 'agent "7"')]

    environ = {
        "REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "POST", "RAW_URI": '/p?q="x"', "SERVER_PROTOCOL": "HTTP/1.1",
        "PATH_INFO": "/p", "QUERY_STRING": 'q="x"', "HTTP_USER_AGENT": 'agent "7"',
    }
    lines = []
    monkeypatch.setattr(logging.Logger, "info", lambda self, msg, *args: lines.append(msg % args[0]))
    stock, quicker = Logger(config), Logger(config)
    quicker_access_lines(quicker)
    for logger in (stock, quicker):
        logger.access(Response, Request, environ, datetime.timedelta(milliseconds=4, microseconds=250))

    stock, ours = lines
    assert ours == stock
    assert '\\"quoted\\"' in ours and 'say \\"hi\\"' in ours and " - " in ours


def test_torch_threads_follow_the_cgroup_v2_cpu_quota(tmp_path):
    from config.settings import cgroup_cpu_limit

    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/app\n")
    root = tmp_path / "sys-fs-cgroup"
    (root / "kubepods" / "pod1" / "app").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "app" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc, root) is None  # no quota anywhere: the affinity decides

    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # the pod's limit: 1.5 CPUs
    assert cgroup_cpu_limit(proc, root) == 2
    (root / "kubepods" / "pod1" / "app" / "cpu.max").write_text("50000 100000\n")  # the container's: half a CPU
    assert cgroup_cpu_limit(proc, root) == 1

    proc.write_text("12:cpu,cpuacct:/docker/abc\n")  # cgroup v1 only: no v2 quota to read
    assert cgroup_cpu_limit(proc, root) is None
    assert cgroup_cpu_limit(tmp_path / "missing", root) is None


def master_of(registry):
    """A stand-in for gunicorn's arbiter as the hooks see it: its app's registry and its worker boots."""
    app = SimpleNamespace(extensions={EXTENSION: registry}, config={})
    return SimpleNamespace(app=SimpleNamespace(wsgi=lambda: app), worker_boots=hooks.WorkerBoots())


def test_a_version_whose_workers_cannot_start_is_refused_once_and_the_one_before_served_again(tmp_path, monkeypatch):
    signals = []
    monkeypatch.setattr(hooks.os, "kill", lambda pid, signum: signals.append(signum))
    path = write_template_checkpoint(tmp_path / "model.pt", seed=1)
    registry = ModelRegistry.from_config({"PRED_MODEL_PATH": str(path)})
    registry.load()  # as the master does before it forks
    server = master_of(registry)
    first = registry.current.version
    boots = server.worker_boots
    boots.started(), boots.started()

    for _ in range(hooks.ROLLBACK_AFTER_FAILURES):  # a worker respawned before any rollout: nothing to go back to
        boots.failed()
        hooks.roll_back_if_failing(server)
    assert signals == [] and registry.current.version == first
    boots.started()

    os.replace(write_template_checkpoint(tmp_path / "second.pt", seed=2), path)
    hooks.on_reload(server)
    second = registry.current.version
    assert second != first and registry.previous.version == first
    for _ in range(hooks.ROLLBACK_AFTER_FAILURES - 1):
        boots.failed()
        hooks.roll_back_if_failing(server)
    assert signals == []
    boots.failed()
    hooks.roll_back_if_failing(server)
    assert signals == [signal.SIGHUP]
    assert registry.last_rollout.outcome is Outcome.REFUSED and registry.last_rollout.version == second
    assert "3 workers in a row failed their warm-up" in registry.refused[second]
    boots.failed()
    hooks.roll_back_if_failing(server)  # the workers of the refused version exit as the reload retires them
    assert signals == [signal.SIGHUP]  # refused once

    hooks.on_reload(server)  # the SIGHUP: back on the first version, without looking at the file again
    assert registry.current.version == first and registry.previous.version == second
    assert registry.last_rollout.outcome is Outcome.SWAPPED and "cannot start" in registry.last_rollout.reason
    boots.started()
    hooks.roll_back_if_failing(server)  # a worker started it: the version before is let go
    assert registry.previous is None and boots.failures == 0

    os.replace(write_template_checkpoint(tmp_path / "third.pt", seed=3), path)
    hooks.on_reload(server)
    boots.started()
    hooks.roll_back_if_failing(server)
    for _ in range(hooks.ROLLBACK_AFTER_FAILURES):  # a later respawn that fails: the version did start
        boots.failed()
        hooks.roll_back_if_failing(server)
    assert signals == [signal.SIGHUP] and registry.previous is None

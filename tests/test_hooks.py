"""What gunicorn's hooks call, without gunicorn: the metrics directory across reloads, one-line errors."""

import os

from config import metrics_dir
from service.hooks import one_line


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

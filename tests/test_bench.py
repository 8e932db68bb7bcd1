"""The benchmark's wrk script sends requests the service accepts (``make bench`` itself is not a test)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests
import torchvision
from PIL import Image

from bench import photos
from bench.run import (
    BEGIN,
    END,
    FLOORS,
    PHOTO_ENV,
    PHOTO_WORKERS,
    PREDICT,
    Gunicorn,
    Nginx,
    digit_png,
    measure_paired,
    memory_table,
    paired_difference,
    post_photo,
    run_wrk,
    workers_memory,
    write_report,
)
from config.settings import child_environment
from tests.support import ROOT, run_gunicorn, running, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    assert shutil.which("wrk"), "wrk is not installed (Debian package wrk; make test installs it)"
    folder = tmp_path_factory.mktemp("bench")
    with run_gunicorn(folder, env={"PRED_MODEL_PATH": tiny_checkpoint}) as gunicorn:
        yield gunicorn


@pytest.fixture(scope="module")
def png_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-image") / "digit.png"
    path.write_bytes(digit_png())
    return path


@pytest.mark.parametrize("images", [1, 16])
def test_the_bench_requests_are_answered_with_predictions(server, png_path, images):
    result = run_wrk(server.url + PREDICT, connections=2, png_path=png_path, images=images, seconds=1)
    assert result["requests"] > 0
    assert result["non_2xx"] == 0
    assert result["connect_errors"] + result["read_errors"] + result["write_errors"] + result["timeouts"] == 0


def test_the_bench_counts_answers_that_are_not_2xx(server, png_path):
    result = run_wrk(server.url + "/api/v1/model/no-such-endpoint", connections=1, png_path=png_path, images=1,
                     seconds=1)
    assert result["requests"] > 0
    assert result["non_2xx"] == result["requests"]


def assert_all_answered(result):
    assert result["requests"] > 0
    assert result["non_2xx"] == 0
    assert result["connect_errors"] + result["read_errors"] + result["write_errors"] + result["timeouts"] == 0


@pytest.mark.parametrize("app", [app for _, app, _ in FLOORS])
def test_the_floors_answer_the_bench_requests(tmp_path, png_path, app, tiny_checkpoint):
    with Gunicorn(tmp_path / "floor.log", workers=1, model_path=tiny_checkpoint, app=app) as floor:
        answer = requests.post(floor.url + PREDICT, files={"image_file": ("digit.png", png_path.read_bytes())},
                               timeout=10)
        assert answer.status_code == 200 and answer.json()["data"][0]["image_filename"] == "digit.png"
        assert_all_answered(run_wrk(floor.url + PREDICT, connections=2, png_path=png_path, images=1, seconds=1))


def test_the_bench_reaches_the_service_through_the_deployed_nginx_site(tmp_path, server, png_path):
    with Nginx(tmp_path / "nginx", server.url.removeprefix("http://")) as nginx:
        result = run_wrk(nginx.url + PREDICT, connections=2, png_path=png_path, images=1, seconds=1)
        assert nginx.cpu_seconds() > 0, "nginx's CPU time counts in the run through it"
    assert_all_answered(result)


def test_paired_runs_take_turns_and_their_difference_is_the_median_of_each_rounds(tmp_path, png_path):
    wsgi_app, flask_app = (app for name, app, _ in FLOORS if name in ("wsgi", "flask"))
    with Gunicorn(tmp_path / "a.log", workers=1, app=wsgi_app) as first, \
            Gunicorn(tmp_path / "b.log", workers=1, app=flask_app) as second:
        runs = measure_paired({"first": first, "second": second}, 2, png_path, seconds=1, rounds=3)

    assert [len(runs["first"]), len(runs["second"])] == [3, 3]
    assert all(run.requests_per_s > 0 and run.non_2xx == 0 for run in runs["first"] + runs["second"])
    difference, first_median, _, each = paired_difference(runs["first"], runs["second"])
    differences = sorted(b.cpu_ms - a.cpu_ms for a, b in zip(runs["first"], runs["second"]))
    assert difference == differences[1] and sorted(each) == differences
    assert first_median == sorted(run.cpu_ms for run in runs["first"])[1]


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-photo") / "photo.jpg"
    path.write_bytes(photos.phone_photo(*photos.SERVED_PHOTO))
    return path


def test_the_bench_photo_is_a_12_megapixel_jpeg_the_size_a_phone_writes(photo_path):
    photo = Image.open(photo_path)
    assert photo.format == "JPEG" and photo.size == (4000, 3000) and "progressive" not in photo.info
    assert 1.2e6 <= photo_path.stat().st_size <= 2e6


def test_the_photo_requests_are_answered_by_a_served_torchvision_model(tmp_path, photo_path):
    model = next(model for model in photos.PHOTO_MODELS if model.architecture == "mobilenet_v3_small")
    checkpoint = photos.write_checkpoint(tmp_path / "model.pt", model)
    with Gunicorn(tmp_path / "photos.log", PHOTO_WORKERS, model_path=checkpoint, env=PHOTO_ENV) as server:
        answer = post_photo(server.url, photo_path)["data"][0]
        result = run_wrk(server.url + PREDICT, connections=1, png_path=photo_path, images=1, seconds=1)
    assert answer["image_filename"] == "photo.jpg"
    assert answer["prediction"] in torchvision.models.get_weight(model.weights).meta["categories"]
    assert_all_answered(result)


def test_workers_memory_is_read_with_each_engine(tmp_path, photo_path):
    model = next(model for model in photos.PHOTO_MODELS if model.architecture == "mobilenet_v3_small")
    checkpoint = photos.write_checkpoint(tmp_path / "model.pt", model)
    memory = {engine: workers_memory(tmp_path, model, checkpoint, photo_path, engine) for engine in ("auto", "torch")}
    for rss, pss, master in memory.values():
        assert 0 < pss <= rss and master > 0
    result = type("Result", (), {"model": model, "memory": memory})
    rows = memory_table([result]).splitlines()[2:]
    assert [row.split(" | ")[2] for row in rows] == ["auto", "torch"]
    assert rows[0].split(" | ")[1] == f"{photos.weights_mb(model):.1f}" == "10.2"


def test_the_margin_study_compares_with_the_full_decode(tmp_path):
    rows, logit_std = photos.margin_study({"2 MP": photos.phone_photo(1600, 1200)}, margins=(1, 3), runs=1)

    reference, reduced, whole = rows
    assert reference.margin is None and reference.max_diff == 0
    assert reduced.decoded == (400, 300) and 0 < reduced.mean_diff < reduced.max_diff and reduced.probability_diff > 0
    assert whole.decoded == (1600, 1200) and whole.max_diff == 0 and whole.probability_diff == 0
    assert logit_std == pytest.approx(photos.LOGIT_STD, rel=0.01)


def test_a_photos_only_run_rewrites_the_photos_report_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nBy hand.\n\n{BEGIN}\nold\n{END}\n\nAlso by hand.\n")
    write_report(path, "## Latest run\n\ndigits", "## Photos\n\nfirst photos")
    write_report(path, None, "## Photos\n\nsecond photos")
    text = path.read_text()
    assert "digits" in text and "second photos" in text and "first photos" not in text and "old" not in text
    write_report(path, "## Latest run\n\nnew digits", None)
    text = path.read_text()
    assert "new digits" in text and "second photos" in text
    assert text.index("new digits") < text.index("second photos") < text.index(END)
    assert text.startswith("# Benchmarks\n\nBy hand.\n\n" + BEGIN) and text.endswith(f"{END}\n\nAlso by hand.\n")


def test_ctrl_c_stops_the_bench_with_one_line(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, "-m", "bench.run", "--limit-duration", "60", "--output", str(output),
               "--plot", str(tmp_path / "plot.png")]
    # Its own process group, as make's in a terminal: Ctrl-C signals the whole group. And SIGINT
    # handled as in a terminal, though a shell starting these tests in the background ignores it.
    process = subprocess.Popen(command, cwd=ROOT, env=child_environment({"PYTHONUNBUFFERED": "1"}),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().startswith("limit without HTTP")
        deadline = time.monotonic() + 120
        while len(psutil.Process(process.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        time.sleep(3)  # the workers are measuring
        os.killpg(process.pid, signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        stop(process)
    assert process.returncode == 130, rest
    assert rest.strip().splitlines() == ["make bench: interrupted; nothing written"], rest
    assert running(workers) == [] and not output.exists()


def test_the_engines_are_timed_side_by_side_with_the_bound_this_core_sets(tiny_checkpoint):
    from bench import engines

    pairs, peak = engines.measure(tiny_checkpoint, digit_png(), rounds=1, runs=2)
    assert [pair.what.split(" ")[1] for pair in pairs] == ["digit_cnn", "mobilenet_v3_small", "resnet18", "+"]
    digits = pairs[0]
    assert digits.flops == 2 * (32 * 9 * 26 * 26 + 64 * 32 * 9 * 24 * 24 + 9216 * 128 + 128 * 10)
    assert pairs[-1].flops is None and peak >= max(pair.gflops(pair.onnx_ms) for pair in pairs[:3])
    assert all(pair.max_difference <= 1e-5 and pair.torch_ms > 0 and pair.onnx_ms > 0 for pair in pairs)
    rows = engines.table(pairs, peak).splitlines()
    assert len(rows) == 2 + len(pairs) + 2 and rows[-1].startswith("The fastest fp32 rate measured on this core")
    lines, _ = engines.verdicts(pairs, peak)
    assert len(lines) == 3  # digit_cnn, mobilenet_v3_small, the model's calls


def test_a_missed_forward_target_says_when_this_core_cannot_reach_it():
    from bench import engines

    # 24 MFLOP: 0.5 ms eager, 0.27 ms on ONNX Runtime, on a core whose peak is 96 GFLOP/s (0.25 ms at best)
    pair = engines.Pair("forward, digit_cnn 1×28×28", 0.5, 0.27, 0.0, flops=24e6)
    assert pair.speedup_bound(96) == pytest.approx(2.0)
    (line,), met = engines.verdicts([pair], 96)
    assert not met and line.startswith("- MISSED") and "this core allows at most 2.0 ×" in line and "89 GFLOP/s" in line
    (line,), met = engines.verdicts([engines.Pair(pair.what, 1.5, 0.5, 0.0, flops=24e6)], 96)
    assert met and line.endswith(": 3.00 ×")

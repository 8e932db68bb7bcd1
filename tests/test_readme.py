"""The README's examples run as written against ``make serve``'s demo, and answer as the README shows.

Every curl line of the README that talks to ``localhost:8080``, and ``make digit.png`` (the image
they send), runs as written with the real curl; every Python example that talks to it runs with
this environment's Python. They run in the project folder against ``flask --app wsgi model serve``
(what ``make serve`` runs) serving a demo model. curl is given ``--fail-with-body``, so an HTTP
error fails the example. A JSON answer shown right after an example must have the keys and kinds
of values of the real answer, with floats unrounded, as the service sends them.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from config.settings import child_environment
from tests.support import BIN, ROOT, serve_demo, wait_until_ready

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
SERVED = "localhost:8080"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)


def blocks():
    """The README's fenced blocks, as (language, text, the language of the block right after it or None,
    that block's text)."""
    found = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(README.read_text())]
    text = README.read_text()
    result = []
    for i, (language, body, _, end) in enumerate(found):
        following = found[i + 1] if i + 1 < len(found) and not text[end : found[i + 1][2]].strip() else None
        result.append((language, body, following[0] if following else None, following[1] if following else None))
    return result


def shell_examples():
    """(command, the JSON shown after it or None) for each README shell line run against the service."""
    examples = []
    for language, body, next_language, next_body in blocks():
        if language != "sh":
            continue
        lines = body.replace("\\\n", " ").splitlines()
        commands = [
            line.strip() for line in lines
            if (line.strip().startswith("curl ") and SERVED in line) or line.strip().startswith("make digit.png")
        ]
        for command in commands:
            shown = next_body if next_language == "json" and command == commands[-1] else None
            examples.append((command, shown))
    return examples


def python_examples():
    """(code, the output shown in its last line's comment) for each README Python example run against the service."""
    examples = []
    for language, body, _, _ in blocks():
        if language == "python" and SERVED.split(":")[0] in body and "8080" in body:
            last = body.rstrip().splitlines()[-1]
            examples.append((body, last.split("#", 1)[1].strip() if "#" in last else None))
    return examples


def same_shape(shown, real, where="answer"):
    """Assert that ``shown`` (from the README) has the keys, kinds and precision of ``real``."""
    if isinstance(real, dict):
        assert isinstance(shown, dict) and list(shown) == list(real), f"{where}: README {shown} != served {real}"
        for key in real:
            same_shape(shown[key], real[key], f"{where}.{key}")
    elif isinstance(real, list):
        assert isinstance(shown, list) and bool(shown) == bool(real), f"{where}: README {shown} != served {real}"
        for item in shown:
            same_shape(item, real[0], f"{where}[]")
    elif isinstance(real, float):
        assert isinstance(shown, float), f"{where}: README {shown!r}, served {real!r}"
        # The service answers unrounded floats: the README shows one as sent.
        assert len(repr(shown).split(".")[-1]) >= 6, f"{where}: README {shown!r} is rounded, served {real!r}"
    else:
        assert type(shown) is type(real), f"{where}: README {shown!r}, served {real!r}"


def pattern(shown):
    """A regular expression for printed output like ``shown``, with any digit (a label) in place of its digits."""
    return re.sub(r"\d", r"\\d", re.escape(shown))


@pytest.fixture(scope="module")
def served(demo_store, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("readme")
    with serve_demo(demo_store, tmp_path) as running:
        wait_until_ready(running.url, running.process, running.log_path, timeout=300)
        yield running


@pytest.fixture(scope="module")
def shell(served, tmp_path_factory):
    """Run a README shell line as written: in the project folder, the service on its test port, real curl
    failing on HTTP errors; return its stdout."""
    bin_dir = tmp_path_factory.mktemp("bin")
    curl = bin_dir / "curl"
    curl.write_text('#!/bin/sh\nexec /usr/bin/curl --silent --show-error --fail-with-body "$@"\n')
    curl.chmod(0o755)
    env = child_environment({"PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(BIN.parent)})
    made = not (ROOT / "digit.png").exists()

    def run(command):
        command = command.replace(SERVED, f"localhost:{served.port}")
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}\n{served.log()[-3000:]}"
        return result.stdout

    yield run
    if made:
        (ROOT / "digit.png").unlink(missing_ok=True)


def test_the_readme_has_examples_to_run():
    commands = [command for command, _ in shell_examples()]
    assert commands[0].startswith("make digit.png"), commands
    assert any("/api/v1/model/predict" in c for c in commands) and any("/infer" in c for c in commands)
    assert python_examples(), "the Open Inference Protocol example"


@pytest.mark.parametrize(("command", "shown"), shell_examples(), ids=[c for c, _ in shell_examples()])
def test_each_shell_example_runs_against_make_serve_and_answers_as_shown(shell, command, shown):
    if not command.startswith("make digit.png"):
        shell("make digit.png")
    output = shell(command)
    if shown is not None:
        same_shape(json.loads(shown), json.loads(output))


@pytest.mark.parametrize(("code", "shown"), python_examples())
def test_each_python_example_runs_against_make_serve_and_prints_as_shown(served, shell, code, shown):
    shell("make digit.png")
    result = subprocess.run(
        [sys.executable, "-c", code.replace(SERVED, f"localhost:{served.port}")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if shown is not None:
        assert re.fullmatch(pattern(shown), result.stdout.strip()), (shown, result.stdout)


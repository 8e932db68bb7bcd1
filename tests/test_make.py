"""The Makefile explains itself."""

import re
import subprocess

from tests.support import ROOT


def test_make_help_lists_every_target_with_its_description():
    result = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    listed = dict(line.split(None, 1) for line in result.stdout.splitlines())
    documented = re.findall(r"^([\w.-]+):.*## (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert {"help", "serve", "test", "bench", "mlflow", "train", "digit.png"} <= set(listed)
    assert listed == {target: description for target, description in documented}

"""scripts/install-system-packages, which `make test` runs: what it installs, how, and when it cannot.

apt-get, sudo and id are stand-ins on a PATH of the test's own (a test cannot install Debian
packages); the script, bash and the decisions are real.
"""

import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

SCRIPT = ROOT / "scripts" / "install-system-packages"
PACKAGES = ("nginx", "chromium", "wrk")


def stand_in(folder, name, body):
    """Write an executable shell script ``name`` into ``folder``."""
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def machine(tmp_path):
    """A PATH with none of the packages, an apt-get that installs them there and logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    # apt-get "installs" a package by creating its command, as the real package does.
    stand_in(
        bin_dir, "apt-get",
        f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {calls}\n'
        f'if [ "$1" = install ]; then for p in "$@"; do case "$p" in -*|install) ;; '
        f'*) printf "#!/bin/bash\\n" > {bin_dir}/$p; /bin/chmod +x {bin_dir}/$p;; esac; done; fi',
    )
    return bin_dir, calls


def run(bin_dir, *packages, uid=0, stdin=subprocess.DEVNULL):
    stand_in(bin_dir, "id", f"echo {uid}")
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *packages],
        env={"PATH": str(bin_dir), "SBIN_DIRS": str(bin_dir)},
        capture_output=True, text=True, stdin=stdin, timeout=30,
    )


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_happens_when_every_command_is_there(machine):
    bin_dir, log = machine
    for name in PACKAGES:
        stand_in(bin_dir, name, "")
    result = run(bin_dir, *PACKAGES)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert calls(log) == []


def test_root_installs_only_the_missing_packages_with_apt_get(machine):
    bin_dir, log = machine
    stand_in(bin_dir, "wrk", "")
    result = run(bin_dir, *PACKAGES)
    assert result.returncode == 0, result.stderr
    assert "installing the Debian packages nginx chromium (apt-get install)" in result.stderr
    assert calls(log) == [
        "apt-get update -q DEBIAN_FRONTEND=noninteractive",
        "apt-get install -y -q --no-install-recommends nginx chromium DEBIAN_FRONTEND=noninteractive",
    ]
    assert (bin_dir / "nginx").exists() and (bin_dir / "chromium").exists()


def test_a_user_with_sudo_installs_through_sudo(machine):
    bin_dir, log = machine
    stand_in(bin_dir, "sudo", f'[ "$1" = -n ] && exit 0\necho "sudo $1" >> {log}\nexport "$1"; shift\nexec "$@"')
    result = run(bin_dir, "wrk", uid=1000)
    assert result.returncode == 0, result.stderr
    assert "(sudo apt-get install)" in result.stderr
    assert calls(log) == [
        "sudo DEBIAN_FRONTEND=noninteractive",
        "apt-get update -q DEBIAN_FRONTEND=noninteractive",
        "sudo DEBIAN_FRONTEND=noninteractive",
        "apt-get install -y -q --no-install-recommends wrk DEBIAN_FRONTEND=noninteractive",
    ]


def test_a_user_without_sudo_is_told_in_one_line_what_to_install(machine):
    bin_dir, log = machine
    result = run(bin_dir, *PACKAGES, uid=1000)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: the tests need the Debian packages nginx chromium wrk; "
        "install them as root: apt-get install nginx chromium wrk"
    ]
    assert calls(log) == []


def test_sudo_that_needs_a_password_nobody_can_type_is_not_tried(machine):
    bin_dir, log = machine
    stand_in(bin_dir, "sudo", f'echo "sudo $*" >> {log}\n[ "$1" = -n ] && exit 1\nexec "${{@:2}}"')
    result = run(bin_dir, "chromium", uid=1000)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: the tests need the Debian packages chromium; install them as root: apt-get install chromium"
    ]
    assert calls(log) == ["sudo -n true"]


def test_without_apt_get_it_names_what_to_install(machine):
    bin_dir, log = machine
    (bin_dir / "apt-get").unlink()
    result = run(bin_dir, "nginx", "wrk")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: the tests need nginx wrk; install them with your system's package manager"
    ]


def test_a_package_that_brings_no_command_fails(machine):
    bin_dir, log = machine
    stand_in(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    result = run(bin_dir, "wrk")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: apt-get installed no wrk command: install it by hand"


def test_make_test_and_ci_install_the_packages_first():
    dry_run = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    setup = dry_run.index("scripts/install-system-packages nginx chromium wrk curl")
    assert any(line.startswith(".venv/bin/python -m pytest") for line in dry_run[setup + 1:])
    ci = Path(ROOT / ".ci" / "run").read_text()
    assert "apt-get" not in ci and "exec make test" in ci

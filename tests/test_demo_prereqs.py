"""`make demo` installs what it needs (scripts/demo_prereqs.sh): the Fashion-MNIST files and Python's venv
through apt-get as root or passwordless sudo, else one command to run and exit 1. Tested without root:
fake `id`, `sudo` and `apt-get` on PATH record what would have been run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo_prereqs.sh"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def fake_bin(tmp_path: Path, *, uid: int, sudo_ok: bool | None, apt: bool = True) -> Path:
    """A PATH of its own: python3, id printing ``uid``, sudo (None: absent) and apt-get that log their args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    tools = {"id": f"echo {uid}", "python3": f'exec {sys.executable} "$@"'}
    if apt:
        tools["apt-get"] = f'echo "apt-get $*" >> {log}'
    if sudo_ok is not None:
        tools["sudo"] = f'echo "sudo $*" >> {log}; [ "$2" = true ] && exit {0 if sudo_ok else 1}; shift; exec "$@"'
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for name in ("env", "bash", "sh"):
        (bin_dir / name).symlink_to(f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else f"/bin/{name}")
    return bin_dir


def run(tmp_path: Path, bin_dir: Path, *, data: Path, dry: bool = False, python: str = "python3"):
    env = {"PATH": str(bin_dir), "FASHION_MNIST_DIR": str(data), "PYTHON": python, **({"DRY_RUN": "1"} if dry else {})}
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def missing(tmp_path) -> Path:
    return tmp_path / "no-data-here"


def test_nothing_to_do_when_the_files_are_there(tmp_path):
    data = tmp_path / "fashion"
    data.mkdir()
    for name in FILES:
        (data / name).write_bytes(b"")
    out = run(tmp_path, fake_bin(tmp_path, uid=1000, sudo_ok=False), data=data)
    assert out.returncode == 0 and out.stdout == "" and calls(tmp_path) == []


def test_root_installs_the_dataset_with_apt_get(tmp_path, missing):
    out = run(tmp_path, fake_bin(tmp_path, uid=0, sudo_ok=None), data=missing)
    assert out.returncode == 0, out.stderr
    assert calls(tmp_path) == ["apt-get install -y -qq dataset-fashion-mnist"]
    assert out.stdout.splitlines()[-1] == "demo_prereqs: installed dataset-fashion-mnist"


def test_passwordless_sudo_is_used_and_dry_run_installs_nothing(tmp_path, missing):
    bin_dir = fake_bin(tmp_path, uid=1000, sudo_ok=True)
    out = run(tmp_path, bin_dir, data=missing, dry=True)
    assert out.returncode == 0
    assert out.stdout.splitlines()[-1] == "would run: sudo -n apt-get install -y dataset-fashion-mnist"
    assert calls(tmp_path) == ["sudo -n true"], "dry run: only the sudo probe"
    out = run(tmp_path, bin_dir, data=missing)
    assert out.returncode == 0 and calls(tmp_path)[-1] == "apt-get install -y -qq dataset-fashion-mnist"


@pytest.mark.parametrize("sudo_ok", [False, None], ids=["sudo-asks-password", "no-sudo"])
def test_without_root_it_prints_the_one_command_and_fails(tmp_path, missing, sudo_ok):
    out = run(tmp_path, fake_bin(tmp_path, uid=1000, sudo_ok=sudo_ok), data=missing)
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1] == "sudo apt-get install -y dataset-fashion-mnist"
    assert not any(c.startswith("apt-get") for c in calls(tmp_path))


def test_without_apt_get_it_says_where_to_put_the_files(tmp_path, missing):
    out = run(tmp_path, fake_bin(tmp_path, uid=0, sudo_ok=None, apt=False), data=missing)
    assert out.returncode == 1 and "make demo FASHION_MNIST_DIR=<that folder>" in out.stdout.splitlines()[-1]


def test_too_old_python_is_named(tmp_path, missing):
    old = tmp_path / "python3.8"
    old.write_text('#!/bin/sh\ncase "$1" in -V) echo "Python 3.8.10";; *) exit 1;; esac\n')
    old.chmod(0o755)
    out = run(tmp_path, fake_bin(tmp_path, uid=0, sudo_ok=None), data=missing, python=str(old))
    assert out.returncode == 1
    assert "is Python 3.8.10; ssl-lightning needs Python >= 3.10" in out.stdout.splitlines()[-1]


def test_make_demo_runs_the_check_first(tmp_path, missing):
    """The Makefile wiring: `make prereqs` (which `demo` depends on) passes DRY_RUN and FASHION_MNIST_DIR."""
    env = {**os.environ, "PATH": f"{fake_bin(tmp_path, uid=0, sudo_ok=None)}:{os.environ['PATH']}"}
    out = subprocess.run(["make", "-s", "-C", str(REPO), "prereqs", "DRY_RUN=1", f"FASHION_MNIST_DIR={missing}"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "would run: apt-get install -y dataset-fashion-mnist"
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "demo"], capture_output=True, text=True, timeout=60)
    assert dry.stdout.index("demo_prereqs.sh") < dry.stdout.index("ssl_lightning fit"), dry.stdout

"""One process of a 2-rank DDP fit dies (SIGKILL) or hangs (SIGSTOP): the surviving rank does not wait
forever. It stops within collective_timeout_s with one error line (exit status 3), and the checkpoints
written before still verify, so `--ckpt_path last` resumes the run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_CLI_ARGS
from ssl_lightning.checkpointing import load_checkpoint
from ssl_lightning.distributed import peer_failure

REPO = Path(__file__).resolve().parents[1]


def test_peer_failure_recognises_a_lost_peer_only():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:46786: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging\nmore lines")
    assert peer_failure(gloo).endswith("Connection reset by peer. This is typically caused by a remote worker hanging")
    try:
        try:
            raise RuntimeError("[unbound_buffer.cc:129] Timed out waiting 15000ms for send operation to complete")
        except RuntimeError as inner:
            raise ValueError("wrapped by a library") from inner
    except ValueError as outer:
        assert "Timed out waiting 15000ms" in peer_failure(outer)
    closure = RuntimeError("Application timeout caused pair closure")  # gloo, a hang seen in a buffer broadcast
    assert peer_failure(closure) == "Application timeout caused pair closure"
    assert peer_failure(RuntimeError("CUDA out of memory")) is None
    assert peer_failure(ValueError("Connection reset by peer")) is None, "only errors of the collectives"


def ddp_fit(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """The tiny run on 2 gloo ranks: 8 steps per epoch (256 samples, global batch 32), last.ckpt every 2 steps."""
    args = [a for a in TINY_CLI_ARGS]
    args[args.index("--data.synthetic_size") + 1] = "256"
    log = run_dir / f"stderr-{time.monotonic_ns()}.txt"  # a file: a stopped rank would hold a pipe open
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "ssl_lightning", "fit", "--config",
                             str(REPO / "experiments/fashion_mnist/vicreg.yaml"), *args, "--trainer.devices", "2",
                             "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
                             "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(run_dir),
                             *extra], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                            start_new_session=True), log  # own process group: a SIGSTOPped rank is cleaned up below


def finish(started: tuple[subprocess.Popen, Path], limit_s: float) -> tuple[int, str]:
    """Exit status of rank 0 and its stderr; every process of the run is gone afterwards."""
    proc, log = started
    try:
        proc.wait(timeout=limit_s)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a stopped rank left behind by the survivor, or all on timeout
        except ProcessLookupError:
            pass
    return proc.returncode, log.read_text()


def kill_rank_1_at_step(step: int, signum: int) -> list[str]:
    callback = f'{{"class_path": "helpers.SignalAtStep", "init_args": {{"step": {step}, "signum": {signum}, "rank": 1}}}}'
    return ["--trainer.callbacks+", callback]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("signum, timeout_s", [(signal.SIGKILL, 600), (signal.SIGSTOP, 10)], ids=["killed", "hung"])
def test_surviving_rank_stops_with_one_line_and_the_run_resumes(tmp_path, signum, timeout_s):
    """Killed: gloo sees the connection reset at once, whatever the timeout. Hung: only the timeout (10 s)
    ends the wait; torch's default would wait 30 minutes."""
    code, err = finish(ddp_fit(tmp_path, "--collective_timeout_s", str(timeout_s),
                               *kill_rank_1_at_step(7, signum)), limit_s=240)
    last_line = err.strip().splitlines()[-1]
    assert code == 3, err[-3000:]
    assert last_line.startswith("error: rank 0 lost another process of this distributed run"), last_line
    assert "--ckpt_path last" in last_line and "Traceback" not in err
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # verified against its record
    assert saved["global_step"] == 6, "the save of step 6 (every 2 steps) precedes the failure at step 7"

    code, err = finish(ddp_fit(tmp_path, "--ckpt_path", "last"), limit_s=240)
    assert code == 0, err[-3000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 16, "resumed to the end"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_that_starts_late_is_waited_for_under_the_rendezvous_timeout(tmp_path):
    """Rank 1 starts 12 s late; the collective timeout (5 s) applies only once both ranks have done a
    step, so the fit finishes. With one timeout for both, as before, rank 0 stopped at start-up."""
    late = '{"class_path": "helpers.SleepAtSetup", "init_args": {"rank": 1, "seconds": 12}}'
    code, err = finish(ddp_fit(tmp_path, "--collective_timeout_s", "5", "--rendezvous_timeout_s", "120",
                               "--trainer.callbacks+", late), limit_s=240)
    assert code == 0, err[-3000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 16


@pytest.mark.parametrize("key", ["collective_timeout_s", "rendezvous_timeout_s"])
def test_timeouts_must_be_positive(capsys, key):
    from ssl_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
              f"--{key}", "0", "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    example = 600 if key == "collective_timeout_s" else 1800
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {key} 0 must be > 0 (seconds), e.g. {example}"

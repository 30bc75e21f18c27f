"""Sweeps without a cluster: grid expansion and run names, the schema check of grid values before
anything is submitted, the per-fit summary.json (finished / preempted / failed), ``finish`` and the
results table (means over seeds, every status shown). The SLURM array and --local runs are in
test_slurm.py.
"""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl

from ssl_lightning import results
from ssl_lightning.cluster import submit as slurm, sweep
from ssl_lightning.callbacks.summary import read_summary, write_json
from ssl_lightning.cli import SSLCLI

ROOT = Path(__file__).resolve().parents[1]
VICREG = ROOT / "experiments/fashion_mnist/vicreg.yaml"


def test_grid_expands_to_configs_x_points_x_seeds_with_readable_stable_names(tmp_path):
    grid = sweep.parse_grid(["model.init_args.var_weight=0,25", "--model.init_args.cov_weight=0,1"])
    assert grid == {"model.init_args.var_weight": ["0", "25"], "model.init_args.cov_weight": ["0", "1"]}
    configs = [Path("a/vicreg.yaml"), Path("b/barlow.yaml")]
    tasks = sweep.expand(configs, grid, [0, 1, 2], tmp_path)
    assert len(tasks) == 2 * 4 * 3, "2 configs x 2 x 2 grid points x 3 seeds"
    assert [t.name for t in tasks[:4]] == ["vicreg-var_weight=0-cov_weight=0-seed0",
                                          "vicreg-var_weight=0-cov_weight=0-seed1",
                                          "vicreg-var_weight=0-cov_weight=0-seed2",
                                          "vicreg-var_weight=0-cov_weight=1-seed0"], "first key slowest, seeds fastest"
    assert tasks[-1].name == "barlow-var_weight=25-cov_weight=1-seed2"
    assert tasks[5].run_dir == tmp_path / tasks[5].name
    assert tasks[5].override_args() == ["--model.init_args.var_weight", "0", "--model.init_args.cov_weight", "1"]
    assert [t.name for t in sweep.expand(configs, grid, [0, 1, 2], tmp_path)] == [t.name for t in tasks], \
        "a requeued task derives the same run directory"
    # keys that share their last part keep as much of their path as tells them apart; unsafe characters go
    grid = sweep.parse_grid(["model.init_args.backbone_kwargs.width=8,16", "data.views=[{size: 16}],[{size: 8}]",
                             "model.init_args.head_kwargs.width=4"])
    assert grid["data.views"] == ["[{size: 16}]", "[{size: 8}]"], "commas inside brackets stay in the value"
    names = [t.name for t in sweep.expand([Path("vicreg.yaml")], grid, None, tmp_path)]
    assert names[0] == "vicreg-backbone_kwargs.width=8-views=__size__16__-head_kwargs.width=4"
    (single,) = sweep.expand([Path("vicreg.yaml")], {}, None, tmp_path)
    assert single.run_dir == tmp_path, "a plain job runs in the sweep directory itself, as before grids existed"
    (one_seed,) = sweep.expand([Path("vicreg.yaml")], {}, [1], tmp_path)
    assert one_seed.run_dir == tmp_path / "vicreg-seed1", "a sweep's task, even alone, has its own directory"


@pytest.mark.parametrize("items, message", [
    (["model.init_args.var_weight"], "is not KEY=V1,V2"),
    (["model.init_args.var_weight=0,,1"], "has an empty or repeated value"),
    (["model.init_args.var_weight=0", "model.init_args.var_weight=1"], "is given twice"),
])
def test_malformed_grids_are_rejected(items, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_grid(items)


def test_configs_with_one_file_name_are_told_apart_by_directory(tmp_path):
    tasks = sweep.expand([Path("fashion_mnist/vicreg.yaml"), Path("cifar10/vicreg.yaml"), Path("x/st.yaml")], {},
                         [0], tmp_path)
    assert [t.name for t in tasks] == ["fashion_mnist-vicreg-seed0", "cifar10-vicreg-seed0", "st-seed0"]


def test_tasks_sharing_a_run_directory_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="share the run directory 'vicreg-projector=a_b'"):
        sweep.expand([Path("vicreg.yaml")], {"model.init_args.projector": ["a/b", "a_b"]}, None, tmp_path)


@pytest.mark.parametrize("grid, message", [
    ("model.init_args.var_weigth=0,25", "--grid model.init_args.var_weigth=0 does not fit"),
    ("model.init_args.var_weight=25,abc", "--grid model.init_args.var_weight=abc does not fit"),
    ("trainer.max_stepz=10", "--grid trainer.max_stepz=10 does not fit"),
])
def test_unknown_keys_and_wrong_types_are_rejected_before_sbatch(grid, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(slurm, "query_partition", lambda name: None)
    monkeypatch.setattr(slurm, "SBATCH", str(tmp_path / "sbatch-must-not-run"))
    with pytest.raises(SystemExit) as exit_info:
        slurm.main(["--config", str(VICREG), "--grid", grid, "--time", "1:00:00", "--runs", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), "nothing written, nothing submitted"


def test_array_size_is_printed_and_max_array_respected(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(slurm, "query_partition", lambda name: None)
    with pytest.raises(SystemExit):
        slurm.main(["--config", str(VICREG), "--grid", "model.init_args.var_weight=0,25",
                    "--grid", "model.init_args.cov_weight=0,1", "--seeds", "0", "1", "2", "--time", "10",
                    "--max-array", "10", "--runs", str(tmp_path)])
    out = capsys.readouterr()
    assert "1 config(s) x 4 grid point(s) x 3 seed(s) = 12 task(s)" in out.out
    assert "12 tasks exceed --max-array 10" in out.err


def test_job_script_runs_each_task_with_its_overrides_in_one_wandb_group(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(slurm, "query_partition", lambda name: None)
    monkeypatch.setattr(slurm, "SBATCH", "/nonexistent/sbatch")
    argv = ["--config", str(VICREG), "--grid", "model.init_args.var_weight=0,25", "--grid",
            "model.init_args.projector=64-64,32-32", "--seeds", "3", "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--time", "30", "--job-name", "abl", "--runs", str(tmp_path), "--eval", "linear,knn", "--dry-run",
            "--", "--trainer.max_steps", "5"]
    slurm.main(argv)
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in script and "WANDB_RUN_GROUP=abl" in script
    assert "sweep finish \"${RUN_DIRS[$i]}\" --exit-code $status --eval linear,knn --eval-epochs 30" in script
    # what bash makes of task 2's arguments is exactly what --local would run
    head = script[script.index("RUN_DIRS=("): script.index('eval "ARGS=')]
    shown = subprocess.run(["bash", "-c", head + 'i=2; eval "ARGS=(${TASK_ARGS[$i]})"; printf "%s\\n" "${ARGS[@]}"; '
                            'echo "${NAMES[$i]}"'], capture_output=True, text=True, check=True).stdout.splitlines()
    args = _args(argv)
    _, tasks = slurm.plan(args)
    assert shown[:-1] == slurm.task_fit_arguments(args, tasks)[2]
    assert shown[-1] == "vicreg-var_weight=25-projector=64-64-seed3"
    assert shown[-7:-1] == ["--trainer.max_steps", "5", "--model.init_args.var_weight", "25",
                            "--model.init_args.projector", "64-64"], "grid values come after (and win over) extra args"


def _args(argv: list[str]):
    args = slurm.parser().parse_args(argv[: argv.index("--")])
    args.extra = argv[argv.index("--") + 1:]
    slurm.resolve_defaults(args)
    args.grid = sweep.parse_grid(args.grid)
    return args


# ---- summary.json of a fit, finish, and the results table --------------------------------------------
TINY = """seed_everything: 0
trainer: {accelerator: cpu, max_epochs: 2, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1, limit_val_batches: 1, logger: false}
model:
  class_path: ssl_lightning.methods.VICReg
  init_args: {backbone: convnet, backbone_kwargs: {width: 4}, projector: 32-32}
data: {dataset: synthetic, synthetic_size: 128, batch_size: 32, num_workers: 0, views: [{size: 16}, {size: 16}]}
spectrum: {num_samples: 64}
knn: {bank_size: 64, num_queries: 32}
"""
STEPS = 8  # 2 epochs x 128 / 32


class AtStep(pl.Callback):
    """SIGUSR1 to this process (the preemption warning) or an exception, after optimizer step ``step``."""

    def __init__(self, step: int = 2, action: str = "signal"):
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.action == "signal":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGUSR1)
        elif trainer.global_step == self.step:
            raise RuntimeError("loss exploded (a test)")


def tiny_fit(run_dir: Path, *extra: str) -> None:
    config = run_dir.parent / "tiny.yaml"
    config.write_text(TINY)
    SSLCLI(args=["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir), *extra])


@pytest.mark.slow
def test_every_fit_writes_a_summary_finished_preempted_collapsed_or_failed(tmp_path):
    # the collapse alarm (RankMe below an impossible 1000 on a 32-d projector) makes a fit "collapsed"
    tiny_fit(tmp_path / "collapsed", "--spectrum.min_rankme", "1000")
    collapsed = read_summary(tmp_path / "collapsed")
    assert (collapsed["status"], collapsed["step"], collapsed["method"], collapsed["seed"]) == \
        ("collapsed", STEPS, "VICReg", 0)
    for name in ("probe/val_top1", "knn/top1", "rank/projector_rankme", "rank/backbone_rankme", "train/loss"):
        assert name in collapsed["final"], name
    assert collapsed["best"]["probe/val_top1"] >= collapsed["final"]["probe/val_top1"]
    assert collapsed["checkpoint"].endswith("last.ckpt") and collapsed["wall_seconds"] > 0

    tiny_fit(tmp_path / "preempted", "--trainer.callbacks+=test_sweep.AtStep")
    preempted = read_summary(tmp_path / "preempted")
    assert (preempted["status"], preempted["step"]) == ("preempted", 2), "stopped at the warning signal's step"
    # a requeued fit continues the preempted one: finished at the planned step, wall time summed
    tiny_fit(tmp_path / "preempted", "--ckpt_path", "last")
    resumed = read_summary(tmp_path / "preempted")
    assert (resumed["status"], resumed["step"]) == ("finished", STEPS)
    assert resumed["wall_seconds"] > preempted["wall_seconds"]

    with pytest.raises(RuntimeError, match="loss exploded"):
        tiny_fit(tmp_path / "failed", "--trainer.callbacks+=test_sweep.AtStep",
                 "--trainer.callbacks.init_args.action=raise")
    failed = read_summary(tmp_path / "failed")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: loss exploded (a test)"


def test_finish_marks_failed_exits_and_evaluates_finished_fits_once(tmp_path, monkeypatch):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    assert sweep.finish(crashed, 1)["status"] == "failed", "died before the fit wrote anything"
    write_json(crashed / "summary.json", {"status": "running", "step": 40})
    assert sweep.finish(crashed, 137) == {"status": "failed", "step": 40,
                                          "error": "the fit exited with code 137; see the task's log"}
    write_json(crashed / "summary.json", {"status": "preempted", "step": 40})
    assert sweep.finish(crashed, 143)["status"] == "preempted", "SLURM ends a requeued job's step: not a failure"
    calls = []
    monkeypatch.setattr(sweep, "evaluate", lambda ckpt, commands, **kw: calls.append(ckpt) or {"linear/top1": 0.5})
    done = tmp_path / "done"
    done.mkdir()
    write_json(done / "summary.json", {"status": "finished", "checkpoint": "x.ckpt"})
    assert sweep.finish(done, 0, commands=["linear"])["eval"] == {"linear/top1": 0.5}
    sweep.finish(done, 0, commands=["linear"])
    assert calls == ["x.ckpt"], "a requeued task that was already evaluated is not evaluated again"
    write_json(done / "summary.json", {"status": "preempted", "checkpoint": "x.ckpt"})
    assert "eval" not in sweep.finish(done, 0, commands=["linear"]), "a preempted fit is evaluated when it finishes"


def fake_run(root: Path, name: str, overrides: dict, seed: int, summary: dict | None) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_json(run_dir / "sweep.json", {"name": name, "config": "/x/st.yaml", "label": "st", "overrides": overrides,
                                        "seed": seed})
    if summary is not None:
        write_json(run_dir / "summary.json", summary)


def test_results_table_means_over_seeds_and_every_status_shown(tmp_path, capsys):
    # power 0.5: linear top1 0.70, 0.72, 0.74 -> mean 0.72, sample std 0.02; power 0.25: one finished
    # run (0.8), one failed, one still running, one never started; preempted runs are not in the means
    for seed, acc in enumerate((0.70, 0.72, 0.74)):
        fake_run(tmp_path, f"st-power=0.5-seed{seed}", {"model.init_args.power": "0.5"}, seed,
                 {"status": "finished", "step": 300, "final": {"rank/projector_rankme": 10.0 + seed},
                  "eval": {"linear/top1": acc}})
    p = {"model.init_args.power": "0.25"}
    fake_run(tmp_path, "st-power=0.25-seed0", p, 0, {"status": "finished", "step": 300, "eval": {"linear/top1": 0.8}})
    fake_run(tmp_path, "st-power=0.25-seed1", p, 1, {"status": "failed", "error": "ValueError: boom"})
    fake_run(tmp_path, "st-power=0.25-seed2", p, 2, {"status": "running", "step": 100})
    fake_run(tmp_path, "st-power=0.25-seed3", p, 3, None)
    fake_run(tmp_path, "st-power=0.25-seed4", p, 4, {"status": "preempted", "step": 50,
                                                     "eval": {"linear/top1": 0.1}})
    results.main([str(tmp_path), "--plot", "linear/top1", "--x", "power"])
    table = (tmp_path / "results.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    row_half = next(line for line in table.splitlines() if "power=0.5 " in line)
    assert "| 3 | 3 finished |" in row_half and "0.72 ± 0.02" in row_half and "11 ± 1" in row_half
    row_quarter = next(line for line in table.splitlines() if "power=0.25 " in line)
    assert "| 5 | 1 failed, 1 finished, 1 pending, 1 preempted, 1 running |" in row_quarter
    assert "| 0.8 (n=1) |" in row_quarter, "only the finished run enters the mean (no spread of one value)"
    assert "- st-power=0.25-seed1: failed (ValueError: boom)" in table
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished", "failed", "running", "pending", "preempted"}
    assert (tmp_path / "linear_top1_vs_power.png").stat().st_size > 1000
    results.main([str(tmp_path), "--metrics", "rank/projector_rankme"])
    assert (tmp_path / "results.md").read_text().startswith("| grid point | runs | status | rank/projector_rankme |")
    with pytest.raises(SystemExit):
        results.main([str(tmp_path), "--plot", "linear/top1", "--x", "lr"])
    assert "--x lr is not a swept key of this sweep; swept: model.init_args.power" in capsys.readouterr().err


def test_local_rerun_of_a_sweep_fits_only_what_is_not_done(tmp_path, monkeypatch, capsys):
    done, todo = (sweep.Task(Path("vicreg.yaml"), {}, seed, "vicreg", f"vicreg-seed{seed}", tmp_path / f"s{seed}")
                  for seed in (0, 1))
    for task in (done, todo):
        task.run_dir.mkdir()
    write_json(done.run_dir / "summary.json", {"status": "finished", "checkpoint": "x.ckpt"})
    fitted = []
    def fake_fit(argv, **kwargs):
        fitted.append(argv)
        return subprocess.CompletedProcess(argv, 3)

    monkeypatch.setattr(sweep.subprocess, "run", fake_fit)
    monkeypatch.setattr(sweep, "evaluate", lambda ckpt, commands, **kw: {"knn/top1_k20": 0.5})
    sweep.run_local([done, todo], [["--a"], ["--b"]], "s", {"commands": ["knn"], "train_samples": None, "epochs": 1})
    assert [argv[-1] for argv in fitted] == ["--b"], "only the unfinished task is fitted"
    assert read_summary(done.run_dir)["eval"] == {"knn/top1_k20": 0.5}, "the finished one is evaluated"
    assert read_summary(todo.run_dir)["status"] == "failed", "exit code 3"
    out = capsys.readouterr().out
    assert "[1/2] vicreg-seed0: finished (fitted before)" in out and "[2/2] vicreg-seed1: failed" in out


def test_local_dry_run_prints_the_fit_commands_and_runs_nothing(capsys, tmp_path):
    slurm.main(["--config", str(VICREG), "--grid", "model.init_args.var_weight=0,25", "--local", "--dry-run",
                "--gpus-per-node", "0", "--runs", str(tmp_path / "runs")])
    commands = [line for line in capsys.readouterr().out.splitlines() if " -m ssl_lightning fit " in line]
    assert len(commands) == 2 and commands[1].endswith("--model.init_args.var_weight 25")
    assert not (tmp_path / "runs").exists()

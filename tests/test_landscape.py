"""Loss landscape: filter-normalised directions, an exact paraboloid, the centre point is the checkpoint's
loss, weights and buffers come back bit for bit (after the Hessian's curvature too), 2 gloo ranks give the
1-process loss and curvature grids, identical checkpoints give identical comparison panels, and the
command writes its files and W&B run.

The checkpoint is a tiny MoCo v2 (2 training steps): its ssl_step pushes keys into the queue (a buffer),
so a grid that did not restore buffers between points would show it at the centre point, which is
evaluated after 4 others on a 3 x 3 grid.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddp import run_distributed
from helpers import tiny_data, tiny_trainer
from ssl_lightning.cli import main
from ssl_lightning.distributed import rank
from ssl_lightning.eval.features import build_datamodule, load_method
from ssl_lightning.landscape import filter_normalized_direction, landscape, loss_grid, method_landscape, parse_grid
from ssl_lightning.landscape.curvature import method_curvature, point_curvature
from ssl_lightning.landscape.objectives import (
    at_checkpoint_step,
    fixed_labelled_images,
    fixed_training_batches,
    perturbed_parameters,
)
from ssl_lightning.methods import MAE, RCMAE, MoCoV2, VICReg
from ssl_lightning.wandb_offline import read_offline_run

AXIS = "-0.5:0.5:3"
FIXED = dict(num_batches=2, batch_size=32, seed=3)
CURVATURE = dict(iters=3, tol=1e-3, num_batches=1, batch_size=16, seed=3)  # 3 Lanczos steps: cost, not accuracy
CURVATURE_AXIS = "0:0.5:2"  # 2 x 2 points: each is a Lanczos run


def test_every_filter_of_the_direction_has_its_weights_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
    d = filter_normalized_direction(model, seed=0)
    for name, w in model.named_parameters():
        if w.dim() > 1:  # conv weight (5, 3, 3, 3): 5 filters; linear weight (7, 180): 7 rows
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1),
                                       rtol=1e-5, atol=0)
        else:  # conv bias, BN weight and bias, linear bias
            assert torch.count_nonzero(d[name]) == 0, name
    again, other = filter_normalized_direction(model, seed=0), filter_normalized_direction(model, seed=1)
    assert all(torch.equal(d[n], again[n]) for n in d)
    assert not torch.equal(d["0.weight"], other["0.weight"]) and not torch.equal(d["3.weight"], other["3.weight"])
    only = filter_normalized_direction(model, seed=0, only={"3.weight"})
    assert torch.count_nonzero(only["0.weight"]) == 0 and torch.equal(only["3.weight"], d["3.weight"])


def test_quadratic_loss_gives_the_expected_paraboloid():
    """L(W, c) = ||W - W0||^2 + ||c - c0||^2 on a float64 Linear(3, 4). Along theta* + a D1 + b D2 (biases
    do not move): L = |R|^2 + 2a<R,D1> + 2b<R,D2> + a^2|D1|^2 + 2ab<D1,D2> + b^2|D2|^2 + |c* - c0|^2,
    R = W* - W0."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, dtype=torch.float64)
    w0, c0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    d1, d2 = filter_normalized_direction(model, seed=5), filter_normalized_direction(model, seed=6)
    axis = parse_grid("-1:1:5")
    grid = loss_grid(model, lambda: float(((model.weight - w0) ** 2).sum() + ((model.bias - c0) ** 2).sum()),
                     d1, d2, axis, axis)
    r, u, v = model.weight.detach() - w0, d1["weight"], d2["weight"]
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    expected = ((r * r).sum() + 2 * a * (r * u).sum() + 2 * b * (r * v).sum() + a ** 2 * (u * u).sum()
                + 2 * a * b * (u * v).sum() + b ** 2 * (v * v).sum() + ((model.bias.detach() - c0) ** 2).sum())
    assert (grid - expected).abs().max() < 1e-5
    with torch.no_grad():  # (0.5, 0.5) computed directly
        model.weight += 0.5 * u + 0.5 * v
        assert grid[3, 3] == pytest.approx(float(((model.weight - w0) ** 2).sum() + ((model.bias - c0) ** 2).sum()))


def test_grid_must_contain_zero():
    assert parse_grid("-1:1:21")[10] == 0.0 and len(parse_grid("-1:1:21")) == 21
    with pytest.raises(ValueError, match="does not contain 0"):
        parse_grid("-1:1:4")
    with pytest.raises(ValueError, match="lo:hi:n"):
        parse_grid("-1:1")


# ---- a tiny MoCo v2 checkpoint ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mocov2_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mocov2_run")
    data = tiny_data()
    torch.manual_seed(0)
    method = MoCoV2(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", queue_size=64,
                    num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                    batch_size=data.hparams.batch_size)
    tiny_trainer(run_dir / "checkpoints", max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(method, data)
    return str(run_dir / "checkpoints" / "last.ckpt")


def test_centre_is_the_checkpoints_loss_and_weights_are_unchanged(mocov2_ckpt):
    method, data = load_method(mocov2_ckpt)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    grid = method_landscape(method, data, parse_grid(AXIS), **FIXED)
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters and queue are restored bit for bit"
    assert method._trainer is None, "the checkpoint clock is detached"

    views = [batch for batch, _ in fixed_training_batches(build_datamodule(data), **FIXED)]
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(views):
            torch.manual_seed(FIXED["seed"] + i)
            losses.append(float(method.ssl_step(batch).loss))
        pushed_once = float(method.ssl_step(views[0]).loss)  # after 2 steps the queue holds other keys
    centre = sum(losses) / len(losses)
    print(f"centre {grid[1, 1]:.6f} independent {centre:.6f}; grid min {grid.min():.4f} max {grid.max():.4f}")
    assert grid[1, 1] == pytest.approx(centre, rel=1e-6)
    assert abs(pushed_once - losses[0]) > 1e-3, "the queue changes the loss, so restoring it is tested"
    assert (grid != grid[1, 1]).sum() >= 7, "the other points moved the loss"


def test_probe_landscape_centre_is_the_probes_cross_entropy(mocov2_ckpt):
    method, data = load_method(mocov2_ckpt)
    grid = method_landscape(method, data, parse_grid(AXIS), loss="probe", **FIXED)
    images = fixed_labelled_images(build_datamodule(data), **FIXED)
    with torch.no_grad():
        expected = sum(float(method.probe.loss(method(x), y)[0]) for x, y in images) / len(images)
    assert grid[1, 1] == pytest.approx(expected, rel=1e-6)
    moved = perturbed_parameters(method, "probe")
    assert "probe.linear.weight" in moved and not any(n.startswith(("projector", "teacher")) for n in moved)


def test_probe_loss_needs_a_probe():
    method = VICReg(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-32", num_classes=0)
    with pytest.raises(ValueError, match="no online linear probe.*use --loss pretrain"):
        perturbed_parameters(method, "probe")
    assert not any(n.startswith("probe") for n in perturbed_parameters(method, "pretrain"))


def test_ssl_step_sees_the_checkpoints_epoch_and_step():
    """DINO's teacher temperature and SwAV's queue start read current_epoch inside ssl_step."""
    method = VICReg(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-32", num_classes=0)
    with at_checkpoint_step(method, epoch=5, global_step=70):
        assert (method.current_epoch, method.global_step) == (5, 70)
        with pytest.raises(AttributeError, match="estimated_stepping_batches.*SSLOutput.logs"):
            method.trainer.estimated_stepping_batches
    assert method._trainer is None and method.current_epoch == 0


def test_mae_landscape_holds_its_masks_fixed(tmp_path):
    """MAE draws a new random mask at every ssl_step; the landscape seeds it per batch, so the same
    call gives the same surface bit for bit, and the centre is the checkpoint's loss with exactly those
    masks. An unseeded step gives a different loss (|difference| > 1e-4), so the check can fail."""
    data = tiny_data(views=[{"size": 16, "scale": (0.5, 1.0)}])
    torch.manual_seed(0)
    method = MAE(backbone="vit_tiny", backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
                 decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=data.num_classes,
                 in_chans=data.channels, image_size=data.image_size, batch_size=data.hparams.batch_size)
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(method, data)
    method, hparams = load_method(tmp_path / "last.ckpt")
    first = method_landscape(method, hparams, parse_grid(AXIS), **FIXED)
    again = method_landscape(method, hparams, parse_grid(AXIS), **FIXED)
    assert torch.equal(first, again), "same command, same surface"
    views = [batch for batch, _ in fixed_training_batches(build_datamodule(hparams), **FIXED)]
    with torch.no_grad():
        seeded = []
        for i, batch in enumerate(views):
            torch.manual_seed(FIXED["seed"] + i)
            seeded.append(float(method.ssl_step(batch).loss))
        unseeded = float(method.ssl_step(views[0]).loss)
    assert first[1, 1] == pytest.approx(sum(seeded) / len(seeded), rel=1e-6)
    assert abs(unseeded - seeded[0]) > 1e-4, "another mask gives another loss"
    assert (first != first[1, 1]).sum() >= 7



def test_probe_curvature_covers_the_evaluated_backbone_even_when_not_trained():
    """The probe landscape moves the evaluated backbone and the probe; its Hessian has exactly those
    variables: RC-MAE's EMA teacher (no gradient in training) and the fixed sin-cos position embedding
    included, so MAE and RC-MAE probe curvatures are over the same kind and number of parameters. Their
    requires_grad flags are as before afterwards."""
    data = tiny_data(views=[{"size": 16, "scale": (0.5, 1.0)}])
    torch.manual_seed(0)
    method = RCMAE(backbone="vit_tiny", backbone_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
                   decoder_dim=32, decoder_depth=1, decoder_heads=2, num_classes=data.num_classes,
                   in_chans=data.channels, image_size=data.image_size, batch_size=data.hparams.batch_size).eval()
    flags = {n: p.requires_grad for n, p in method.named_parameters()}
    result = point_curvature(method, dict(data.hparams), loss="probe", trace_samples=2, **CURVATURE)
    teacher = method.evaluated_modules()[0]
    assert teacher is method.teacher["backbone"] and not any(p.requires_grad for p in teacher.parameters())
    assert result["parameters"] == sum(p.numel() for m in (teacher, method.probe) for p in m.parameters())
    assert result["parameters"] > 10 * sum(p.numel() for p in method.probe.parameters())
    assert {n: p.requires_grad for n, p in method.named_parameters()} == flags
    assert math.isfinite(result["lambda_max"]) and result["lambda_max"] > 0


# ---- distributed ---------------------------------------------------------------------------------------
def landscape_on_rank(rank_: int, world: int, ckpt: str) -> dict:
    method, data = load_method(ckpt)
    grid = method_landscape(method, data, parse_grid(AXIS), **FIXED)
    curvature = method_curvature(method, data, parse_grid(CURVATURE_AXIS), **CURVATURE)
    calls = []
    model = nn.Linear(2, 2)
    loss_grid(model, lambda: float(calls.append(rank()) or 0.0), *[filter_normalized_direction(model, seed=s)
                                                                     for s in (0, 1)], *[parse_grid(AXIS)] * 2)
    return {"grid": grid, "curvature": curvature, "points_evaluated": len(calls)}


@pytest.mark.distributed
def test_two_ranks_give_the_one_process_grid(mocov2_ckpt, tmp_path):
    """Rank 0 evaluates points 0, 2, 4, 6, 8 and rank 1 points 1, 3, 5, 7 of the 3 x 3 grid; both end
    with the full grid; likewise for the 2 x 2 (lambda_min, lambda_max) curvature map. Tolerance 1e-5
    relative for the loss, 1e-4 for the eigenvalues (Lanczos amplifies rounding): the ranks run on 1
    thread, this process on 2."""
    method, data = load_method(mocov2_ckpt)
    single = method_landscape(method, data, parse_grid(AXIS), **FIXED)
    single_curvature = method_curvature(method, data, parse_grid(CURVATURE_AXIS), **CURVATURE)
    ranks = run_distributed(landscape_on_rank, mocov2_ckpt, out_dir=tmp_path)
    assert [r["points_evaluated"] for r in ranks] == [5, 4]
    assert torch.equal(ranks[0]["grid"], ranks[1]["grid"]) and torch.equal(ranks[0]["curvature"],
                                                                            ranks[1]["curvature"])
    torch.testing.assert_close(ranks[0]["grid"], single, rtol=1e-5, atol=0)
    torch.testing.assert_close(ranks[0]["curvature"], single_curvature, rtol=1e-4, atol=1e-6)


# ---- the command ----------------------------------------------------------------------------------------
def test_command_writes_npz_plots_summary_and_wandb_run(mocov2_ckpt, capsys):
    main(["landscape", "--ckpt", mocov2_ckpt, "--grid", "-1:1:3", "--batches", "1", "--batch_size", "32"])
    out_dir = Path(mocov2_ckpt).parent.parent / "landscape"  # the default: <run>/landscape/
    saved = np.load(out_dir / "landscape_pretrain.npz")
    assert saved["losses"].shape == (3, 3) and list(saved["alphas"]) == [-1.0, 0.0, 1.0]
    assert np.isfinite(saved["losses"]).all()
    for kind in ("contour", "surface"):
        png = (out_dir / f"landscape_pretrain_{kind}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = json.loads((out_dir / "landscape_pretrain_summary.json").read_text())
    assert summary["center"] == pytest.approx(float(saved["losses"][1, 1]))
    assert summary["min"] <= summary["center"] <= summary["max"] and 1 / 9 <= summary["flatness"] <= 1
    assert "flatness" in capsys.readouterr().out
    (run,) = [read_offline_run(d) for d in (out_dir.parent / "wandb").glob("offline-run-*")]
    assert run["config"]["command"] == "landscape"
    assert math.isclose(run["summary"]["eval/landscape/pretrain/center"], summary["center"])
    for kind in ("contour", "surface"):
        assert run["summary"][f"eval/landscape/pretrain/{kind}/_type"] == "image-file"


# ---- curvature and comparison ---------------------------------------------------------------------------


def test_curvature_restores_weights_and_queue(mocov2_ckpt):
    """The Hessian of MoCo v2's loss (its ssl_step pushes to the queue buffer at every call) leaves every
    parameter and buffer as it was, bit for bit, and its extremes bracket the trace's average eigenvalue."""
    method, data = load_method(mocov2_ckpt)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    result = point_curvature(method, data, trace_samples=4, **CURVATURE)
    grid = method_curvature(method, data, parse_grid(CURVATURE_AXIS), **CURVATURE)
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    print({k: round(v, 4) for k, v in result.items()})
    assert result["lambda_min"] <= result["trace"] / result["parameters"] <= result["lambda_max"]
    assert result["ratio"] == pytest.approx(abs(result["lambda_min"] / result["lambda_max"]))
    assert grid.shape == (2, 2, 2) and (grid[..., 0] <= grid[..., 1]).all()
    assert grid[0, 0, 1] == pytest.approx(result["lambda_max"], rel=1e-6), "same objective, seed and Lanczos start"


def test_identical_checkpoints_give_identical_panels(mocov2_ckpt, tmp_path):
    """Two copies of one checkpoint in one comparison: the same grid, direction seeds, batches and masks,
    so both panels, curvature maps and table rows are equal bit for bit; one figure and a 2-row table."""
    copy = tmp_path / "copy" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(Path(mocov2_ckpt).read_bytes())
    rows, paths = landscape([mocov2_ckpt, str(copy)], grid=AXIS, curvature=CURVATURE_AXIS, out=tmp_path / "cmp",
                            trace_samples=2, **CURVATURE)
    first, second = (np.load(paths[f"{label}/npz"]) for label in (rows[0]["label"], rows[1]["label"]))
    for key in ("losses", "lambda_min_map", "lambda_max_map"):
        assert np.array_equal(first[key], second[key]), key
    numbers = ("center", "flatness", "convex_fraction", "lambda_max", "lambda_min", "trace")
    assert all(rows[0][k] == rows[1][k] for k in numbers)
    assert rows[0]["label"] != rows[1]["label"] and 0 <= rows[0]["convex_fraction"] <= 1
    table = paths["table_csv"].read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("label,center,flatness,convex_fraction,lambda_max")
    assert paths["compare"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hessian_and_compare_commands_write_files_and_wandb_runs(mocov2_ckpt, tmp_path, capsys):
    """`hessian` writes hessian_pretrain.json with the numbers point_curvature gives for the same arguments;
    `landscape --ckpt A B --labels` writes the comparison figure and table and logs each label's row. A copy of
    the checkpoint in its own run folder keeps these W&B runs apart from the other tests'."""
    copy = tmp_path / "run" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(Path(mocov2_ckpt).read_bytes())
    ckpt = str(copy)
    main(["hessian", "--ckpt", ckpt, "--batches", "1", "--batch_size", "16", "--seed", "3", "--iters", "3",
          "--trace_samples", "2", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "hessian_pretrain.json").read_text())
    method, data = load_method(ckpt)
    direct = point_curvature(method, data, trace_samples=2, **CURVATURE)  # MoCo v2 reads no schedule in ssl_step
    assert written["lambda_max"] == pytest.approx(direct["lambda_max"], rel=1e-6)
    assert written["trace"] == pytest.approx(direct["trace"], rel=1e-6)
    assert "lambda_min" in capsys.readouterr().out

    main(["landscape", "--ckpt", ckpt, ckpt, "--labels", "a", "b", "--grid", "-1:1:3", "--batches",
          "1", "--batch_size", "16", "--out", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp" / "landscape_pretrain_compare.png").is_file()
    assert (tmp_path / "cmp" / "landscape_pretrain_table.csv").read_text().count("\n") == 3
    runs = [read_offline_run(d) for d in (Path(ckpt).parent.parent / "wandb").glob("offline-run-*")]
    compare = [r for r in runs if r["config"]["command"] == "landscape" and "eval/landscape/pretrain/a/center"
               in r["summary"]]
    assert len(compare) == 1 and compare[0]["summary"]["eval/landscape/pretrain/compare/_type"] == "image-file"
    assert any(r["config"]["command"] == "hessian" and "eval/hessian/pretrain/trace" in r["summary"] for r in runs)

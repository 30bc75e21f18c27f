"""ssl-lightning label-efficiency: nested class-balanced subsets, the labels-saved interpolation on
hand-made curves, end-to-end runs of both protocols on a tiny checkpoint, and one-line errors."""
import csv
import math

import pytest
import torch

from helpers import tiny_checkpoint, tiny_data
from ssl_lightning.cli import main
from ssl_lightning.eval.finetune import balanced_subset, nested_subsets
from ssl_lightning.eval.label_efficiency import LabelsSaved, labels_saved, rounding_notes, train_linear_heads
from ssl_lightning.eval.linear import train_linear
from ssl_lightning.wandb_offline import read_offline_run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A width-4 VICReg convnet after 2 steps on synthetic data (128 train images, about 13 per class)."""
    tmp = tmp_path_factory.mktemp("run")
    data = tiny_data()
    return tiny_checkpoint(tmp, data)


def test_subsets_nest_are_balanced_and_round_up_to_one():
    """Classes of 50, 200 and 1000 (and 30 unlabelled): 1% keeps round(0.5) -> 1 (rounded up), 2 and
    10; 10% keeps 5, 20, 100; 100% all 1250. Each seed's 1% lies inside its 10%; seeds differ."""
    labels = torch.cat([torch.full((50,), 0), torch.full((200,), 1), torch.full((1000,), 2), torch.full((30,), -1)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    for seed in (0, 1):
        subsets = nested_subsets(labels, [0.01, 0.1, 1.0], seed=seed)
        assert torch.bincount(labels[subsets[0.01]]).tolist() == [1, 2, 10]
        assert torch.bincount(labels[subsets[0.1]]).tolist() == [5, 20, 100]
        assert len(subsets[1.0]) == 1250 and bool((labels[subsets[1.0]] >= 0).all())
        assert set(subsets[0.01].tolist()) <= set(subsets[0.1].tolist()) <= set(subsets[1.0].tolist())
        assert torch.equal(subsets[0.1], balanced_subset(labels, 0.1, seed=seed)), "finetune draws the same subset"
    assert not torch.equal(nested_subsets(labels, [0.1], seed=0)[0.1], nested_subsets(labels, [0.1], seed=1)[0.1])
    assert rounding_notes(labels, [1, 10, 100]) == [
        "note: 1% is less than one image in 1 of 3 classes (of 50..50): rounded up to 1 per class, 13 labelled "
        "images (1.04% of 1250)"]


def test_labels_saved_interpolates_on_the_log_fraction_axis():
    """Baseline 50, 70, 90% at 1, 10, 100% of the labels. SSL 60% at 1%: halfway from 50 to 70, i.e.
    10 ** 0.5 = 3.162% (3.162x the labels); SSL 80% at 10%: 10 ** 1.5 = 31.62%; SSL 95% at 100%: never
    reached, "> 100%". Second curve: SSL 45% at 1% is reached at 1% already ("<= 1%"); 72% at 10% is
    a tenth of the way from 10 to 100: 10 ** 1.1 = 12.59% (1.259x); 90% at 100% needs exactly 100% (1x)."""
    first = labels_saved([1, 10, 100], [0.60, 0.80, 0.95], [0.50, 0.70, 0.90])
    assert [x.bound for x in first] == ["=", "=", ">"]
    assert [x.needed for x in first] == pytest.approx([10 ** 0.5, 10 ** 1.5, 100])
    assert [x.ratio for x in first] == pytest.approx([10 ** 0.5, 10 ** 0.5, 1])
    assert [x.text() for x in first] == [("3.16%", "3.16x"), ("31.6%", "3.16x"), ("> 100%", "> 1x")]
    second = labels_saved([1, 10, 100], [0.45, 0.72, 0.90], [0.50, 0.70, 0.90])
    assert [(x.bound, round(x.needed, 4)) for x in second] == [("<=", 1), ("=", round(10 ** 1.1, 4)), ("=", 100)]
    assert second[1].ratio == pytest.approx(1.2589, abs=1e-4)
    assert LabelsSaved(5, 25, ">").text() == ("> 25%", "> 5x"), "a bound at the largest fraction measured"
    with pytest.raises(ValueError, match="strictly ascending"):
        labels_saved([10, 1], [0.5, 0.6], [0.5, 0.6])


def test_probes_trained_together_are_train_linears_probes():
    """Two seeds' probes trained at once (3 epochs of 3 batches) equal train_linear's one by one:
    measured max difference 4e-9 (float rounding of the batched matmul)."""
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(2, 2500, 16, generator=g), torch.randint(0, 4, (2, 2500), generator=g)
    weight, bias = train_linear_heads(xs, ys, num_classes=4, seeds=[0, 7], epochs=3)
    for s, seed in enumerate([0, 7]):
        head = train_linear(xs[s], ys[s], num_classes=4, seed=seed, epochs=3)
        torch.testing.assert_close(weight[s], head.weight.detach().T, rtol=0, atol=1e-6)
        torch.testing.assert_close(bias[s], head.bias.detach(), rtol=0, atol=1e-6)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_linear_protocol_end_to_end_with_scratch_baseline(tiny_ckpt, capsys):
    """Fractions 2, 50, 100 and seeds 0, 1 on 8 classes of 13 images and 2 of 12: 2% is rounded up to 1
    per class (a note), 10 labelled images; 50% keeps round(6.5) = 6 (halves round to even) and 6 per
    class, 60 images. Table, CSVs and plot in <run dir>/label_efficiency; logged to an offline W&B run."""
    run_dir = tiny_ckpt.parent.parent
    main(["label-efficiency", "--ckpt", str(tiny_ckpt), "--fractions", "100", "2", "50", "--seeds", "0", "1",
          "--epochs", "5"])
    out = capsys.readouterr().out
    assert "note: 2% is less than one image in 10 of 10 classes" in out and "10 labelled images" in out
    assert "baseline: scratch (frozen random network)" in out
    rows = read_csv(run_dir / "label_efficiency" / "linear.csv")
    assert [float(r["fraction_percent"]) for r in rows] == [2, 50, 100]
    assert [int(r["labelled"]) for r in rows] == [10, 60, 128]
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("ssl_top1_mean", "baseline_top1_mean"))
    assert len(read_csv(run_dir / "label_efficiency" / "linear_runs.csv")) == 2 * 3 * 2, "model x fraction x seed"
    assert (run_dir / "label_efficiency" / "linear.png").stat().st_size > 1000
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(wandb_run)
    assert run["config"]["command"] == "label-efficiency-linear"
    assert math.isclose(run["summary"]["eval/label_efficiency/ssl_top1_mean_100pct"], float(rows[2]["ssl_top1_mean"]))


def test_checkpoint_baseline_equal_to_itself_saves_no_labels(tiny_ckpt, tmp_path, capsys):
    """--baseline CKPT with the same checkpoint: identical accuracies, so the baseline needs exactly f
    at every fraction but the first, where it is already there ("<= 10%")."""
    main(["label-efficiency", "--ckpt", str(tiny_ckpt), "--baseline", str(tiny_ckpt), "--fractions", "10", "100",
          "--seeds", "3", "--epochs", "2", "--no_wandb", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "linear.csv")
    assert [r["ssl_top1_mean"] for r in rows] == [r["baseline_top1_mean"] for r in rows]
    assert [(r["baseline_needs_bound"], float(r["labels_saved_ratio"])) for r in rows] == [("<=", 1.0), ("=", 1.0)]


def test_finetune_protocol_one_fraction_one_seed(tiny_ckpt, tmp_path, capsys):
    main(["label-efficiency", "--ckpt", str(tiny_ckpt), "--protocol", "finetune", "--fractions", "50", "--seeds",
          "0", "--epochs", "1", "--batch_size", "16", "--no_wandb", "--out", str(tmp_path)])
    assert "baseline: scratch (random init)" in capsys.readouterr().out
    (row,) = read_csv(tmp_path / "finetune.csv")
    assert int(row["labelled"]) == 60 and row["baseline_needs_bound"] in ("<=", ">")
    assert len(read_csv(tmp_path / "finetune_runs.csv")) == 2


@pytest.mark.parametrize("args, message", [
    (["--fractions", "0"], "argument --fractions: --fractions 0 is not a percentage in (0, 100]; use e.g. 1 10 100"),
    (["--fractions", "1", "150"], "--fractions 150 is not a percentage in (0, 100]"),
    (["--protocol", "knn"], "argument --protocol: invalid choice: 'knn' (choose from"),
])
def test_bad_options_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["label-efficiency", "--ckpt", "x.ckpt", *args])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ssl-lightning label-efficiency: error: ") and message in last, last
    if "protocol" in message:
        assert "linear" in last and "finetune" in last

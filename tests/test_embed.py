"""ssl-lightning embed: features, labels and paths of a dataset, readable by plain numpy (.npz) or torch (.pt)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_CLI_ARGS
from ssl_lightning.cli import main
from ssl_lightning.eval.embed import embed_dataset
from ssl_lightning.eval.features import load_method

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """4 steps of tiny VICReg on 128 synthetic 16 px images (TINY_CLI_ARGS)."""
    run = tmp_path_factory.mktemp("fit")
    main(["fit", "--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
          "--trainer.default_root_dir", str(run), "--trainer.logger", "false", "--trainer.limit_val_batches", "0"])
    return run / "checkpoints" / "last.ckpt"


def test_npz_is_plain_numpy_with_paths_and_labels(checkpoint, tmp_path):
    out = tmp_path / "emb.npz"
    main(["embed", "--ckpt", str(checkpoint), "--split", "both", "--projector", "--out", str(out)])
    with np.load(out, allow_pickle=False) as f:  # no pickle: readable without this package
        features, labels, paths, splits = f["features"], f["labels"], f["paths"], f["splits"]
        projections = f["projections"]
    method, data = load_method(checkpoint)
    expected = method(torch.zeros(1, 3, 16, 16)).shape[1]
    assert features.shape == (256, expected) and features.dtype == np.float32
    assert projections.shape == (256, 32) and labels.shape == (256,) and labels.dtype == np.int64
    assert paths[0] == "synthetic/train/00000" and paths[-1] == "synthetic/val/00127"
    assert list(splits[:128]) == ["train"] * 128 and set(labels.tolist()) == set(range(10))
    direct = embed_dataset(method, data, "val")  # the same function, called from Python
    assert torch.allclose(direct["features"], torch.from_numpy(features[128:]), atol=1e-5)
    assert direct["labels"].tolist() == labels[128:].tolist()


def test_pt_file(checkpoint, tmp_path):
    out = tmp_path / "emb.pt"
    main(["embed", "--ckpt", str(checkpoint), "--split", "train", "--out", str(out)])
    saved = torch.load(out, weights_only=True)
    assert saved["features"].shape[0] == 128 and len(saved["paths"]) == 128 and "projections" not in saved


@pytest.mark.parametrize("case", ["suffix", "missing_ckpt"])
def test_bad_input_is_one_line_error(checkpoint, tmp_path, capsys, case):
    ckpt = str(checkpoint) if case == "suffix" else str(tmp_path / "none.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / ("emb.csv" if case == "suffix" else "emb.npz"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ")

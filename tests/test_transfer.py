"""Evaluating a checkpoint on another dataset (--data.*): a Fashion-MNIST checkpoint on scikit-learn's
digits and on an image folder of digit PNGs, channel adaptation both ways, and one-line errors."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_checkpoint, tiny_data
from ssl_lightning.cli import main
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.datasets import DatasetInfo, load_dataset
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.eval.transfer import LUMINANCE, input_adapter


@pytest.fixture(scope="module")
def fashion_ckpt(tmp_path_factory):
    """A width-4 VICReg convnet (1 channel, 28 px) after 2 steps on real Fashion-MNIST."""
    tmp = tmp_path_factory.mktemp("fashion")
    data = SSLDataModule(dataset="fashion_mnist", batch_size=32, num_workers=0, views=[ViewConfig(size=28)] * 2)
    return tiny_checkpoint(tmp, data)


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory):
    """A width-4 VICReg convnet (3 channels, 16 px) after 2 steps on synthetic data."""
    tmp = tmp_path_factory.mktemp("rgb")
    data = tiny_data()
    return tiny_checkpoint(tmp, data)


def note_line(out: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith("note: evaluating on")]
    return line


def test_digits_dataset_is_a_fixed_stratified_split():
    """1797 images, 8x8, values 0..255: 80/20 per class -> 1438 train, 359 val, every class in both."""
    train, val = load_dataset("digits", None, "train"), load_dataset("digits", None, "val")
    assert (len(train), len(val)) == (1438, 359)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8 and train.images.max() == 255
    assert torch.bincount(val.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert torch.equal(train.labels, load_dataset("digits", None, "train").labels), "the split is fixed"


def test_fashion_checkpoint_linear_on_digits(fashion_ckpt, capsys):
    """Fashion-MNIST -> digits (1 channel both): resized 8 -> 28 px. Measured when written: 64.6% top-1 on
    the 359 val digits after 2 training steps (a nearly random convnet's features already separate
    digits); chance is 10%, 40% is 10 standard errors (2.6 points) below the measurement."""
    main(["linear", "--ckpt", str(fashion_ckpt), "--data.dataset", "digits", "--epochs", "100", "--no_wandb"])
    out = capsys.readouterr().out
    assert note_line(out) == ("note: evaluating on digits (10 classes) instead of the checkpoint's fashion_mnist: "
                              "resized from 8 px to 28 px, 1 channel as trained, normalised with the mean/std of "
                              "digits")
    top1 = float(out.split("linear/top1: ")[1].split()[0])
    assert 0.4 < top1 <= 1.0


def write_digit_folder(root, classes=(0, 1, 2), per_split=(60, 20)):
    """train/<digit>/*.png and val/<digit>/*.png: 8x8 gray PNGs of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for c in classes:
        images = np.round(bunch.images[bunch.target == c] * (255 / 16)).astype(np.uint8)
        for split, chunk in (("train", images[:per_split[0]]), ("val", images[per_split[0]:sum(per_split)])):
            (root / split / str(c)).mkdir(parents=True)
            for i, image in enumerate(chunk):
                Image.fromarray(image, mode="L").save(root / split / str(c) / f"{i}.png")


def test_fashion_checkpoint_on_an_image_folder(fashion_ckpt, tmp_path, capsys):
    """240 digit PNGs in 3 class folders, decoded as RGB: 3 -> 1 channel (luminance); 3 classes come
    from the folder, so finetune reports no top-5 (it does for more than 5 classes) and knn runs too."""
    write_digit_folder(tmp_path / "digits")
    options = ["--data.dataset", "imagefolder", "--data.data_dir", str(tmp_path / "digits"), "--no_wandb"]
    main(["finetune", "--ckpt", str(fashion_ckpt), "--labels", "100", "--epochs", "1", "--batch_size", "30",
          *options])
    out = capsys.readouterr().out
    assert note_line(out) == ("note: evaluating on imagefolder (3 classes) instead of the checkpoint's fashion_mnist: "
                              "resized to 28 px, 3 -> 1 channel (luminance), normalised with the mean/std of "
                              "imagefolder")
    assert "finetune/labelled_samples: 180.0000" in out and "finetune/top5" not in out
    main(["knn", "--ckpt", str(fashion_ckpt), "--ks", "5", *options])
    assert "knn/top1_k5" in capsys.readouterr().out


def test_rgb_checkpoint_on_digits_repeats_the_channel(rgb_ckpt, capsys):
    main(["linear", "--ckpt", str(rgb_ckpt), "--data.dataset", "digits", "--epochs", "2", "--no_wandb"])
    assert "resized from 8 px to 16 px, 1 -> 3 channels (gray repeated)" in note_line(capsys.readouterr().out)


def test_gray_checkpoint_on_synthetic_rgb_takes_the_luminance(fashion_ckpt, capsys):
    main(["linear", "--ckpt", str(fashion_ckpt), "--data.dataset", "synthetic", "--epochs", "2", "--no_wandb"])
    assert "resized to 28 px, 3 -> 1 channel (luminance)" in note_line(capsys.readouterr().out)


def test_luminance_of_normalised_channels_is_the_normalised_luminance():
    """Gray pixels g stored as RGB, normalised per channel (x - m_c) / s_c: the adapter gives
    (g - sum w_c m_c) / sum w_c s_c exactly; 1 -> 3 repeats the channel."""
    info = DatasetInfo(3, 4, 10, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    gray = torch.rand(2, 1, 4, 4)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    w = torch.tensor(LUMINANCE)
    expected = (gray - (w * torch.tensor(info.mean)).sum()) / (w * torch.tensor(info.std)).sum()
    torch.testing.assert_close(input_adapter(1, info)((gray - mean) / std), expected)
    one = DatasetInfo(1, 4, 10, (0.3,), (0.2,))
    assert torch.equal(input_adapter(3, one)(gray), gray.expand(-1, 3, -1, -1))


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_line(rgb_ckpt, tmp_path, capsys, monkeypatch):
    """A backbone taking 2 channels (first convolution cut to 2 input channels), digits without
    scikit-learn, a missing folder and an empty one: exit status 2 and one line on stderr."""
    checkpoint = torch.load(rgb_ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["in_chans"] = 2
    weights = checkpoint["state_dict"]
    weights["backbone.features.0.weight"] = weights["backbone.features.0.weight"][:, :2]
    (tmp_path / "two" / "checkpoints").mkdir(parents=True)
    two = tmp_path / "two" / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, two)
    with pytest.raises(SystemExit) as exit_info:
        main(["linear", "--ckpt", str(two), "--data.dataset", "digits", "--no_wandb"])
    assert exit_info.value.code == 2
    assert last_error(capsys) == ("error: the checkpoint's backbone takes 2-channel images and the data has 1; only "
                                  "1 <-> 3 channels can be adapted: evaluate on a dataset with 2 channels")
    with monkeypatch.context() as patch:  # scikit-learn missing: importing it fails
        patch.setitem(sys.modules, "sklearn.datasets", None)
        with pytest.raises(SystemExit):
            main(["linear", "--ckpt", str(rgb_ckpt), "--data.dataset", "digits", "--no_wandb"])
    assert last_error(capsys) == ("error: digits: the dataset ships with scikit-learn, which is not installed; "
                                  "`pip install scikit-learn`")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit):
            main(["knn", "--ckpt", str(rgb_ckpt), "--data.dataset", "imagefolder", "--data.data_dir", str(folder),
                  "--no_wandb"])
        line = last_error(capsys)  # the loader's message: "imagefolder: <dir> has no train/ directory ..."
        assert line.startswith(f"error: imagefolder: {folder} ") and "data.data_dir" in line, line

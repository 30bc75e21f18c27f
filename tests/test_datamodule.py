"""SSLDataModule: batches, views, multi-crop, grayscale, unlabelled folders, and bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.views import ViewConfig


def first_batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_training_batch_is_views_and_labels():
    views, labels = first_batch(tiny_data())
    assert len(views) == 2 and all(v.shape == (32, 3, 16, 16) and v.dtype == torch.float32 for v in views)
    assert labels.shape == (32,) and labels.min() >= 0
    assert not torch.equal(views[0], views[1]), "two independent augmentations"


def test_multicrop_views():
    dm = tiny_data(views=[ViewConfig(size=16, count=2, scale=(0.4, 1.0)), ViewConfig(size=8, count=3, scale=(0.05, 0.4))])
    views, _ = first_batch(dm)
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16)] * 2 + [(8, 8)] * 3


def test_fashion_mnist_is_grayscale_and_validation_is_labelled():
    dm = SSLDataModule(dataset="fashion_mnist", batch_size=64, num_workers=0,
                       views=[ViewConfig(size=28, jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p=0.5)] * 2)
    assert (dm.channels, dm.num_classes, dm.image_size) == (1, 10, 28)
    views, _ = first_batch(dm)
    assert views[0].shape == (64, 1, 28, 28)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (64, 1, 28, 28) and labels.max() < 10


def write_folder(root, n=8, corrupt=False):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    if corrupt:
        (root / "broken.jpg").write_bytes(b"not a jpeg at all")


def test_unlabelled_imagefolder_trains_with_probe_off(tmp_path):
    write_folder(tmp_path / "train")
    dm = SSLDataModule(dataset="imagefolder", data_dir=str(tmp_path), labelled=False, batch_size=4,
                       num_workers=0, views=[ViewConfig(size=16)] * 2)
    assert dm.num_classes == 0
    with pytest.warns(UserWarning, match="probe is off"):
        model = tiny_vicreg(dm)
    trainer = tiny_trainer(tmp_path / "ckpt", max_epochs=1)
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and model.probe is None


def test_corrupt_image_names_the_file(tmp_path):
    write_folder(tmp_path / "train", n=3, corrupt=True)
    dm = SSLDataModule(dataset="imagefolder", data_dir=str(tmp_path), labelled=False, batch_size=4,
                       num_workers=0, views=[ViewConfig(size=16)] * 2)
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.jpg"):
        first_batch(dm)


def test_indivisible_batch_size_is_an_error():
    dm = tiny_data(batch_size=100)
    dm.trainer = SimpleNamespace(world_size=8)
    with pytest.raises(ValueError, match="batch_size 100 is not divisible by 8 devices"):
        dm.setup("fit")


def test_dataset_smaller_than_one_batch_is_an_error():
    dm = tiny_data(synthetic_size=16, batch_size=32)
    with pytest.raises(ValueError, match="16 samples, fewer than one global batch of 32"):
        dm.setup("fit")


def test_missing_data_dir_is_an_error_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")) as err:
        SSLDataModule(dataset="cifar10", data_dir=str(tmp_path / "nowhere"))
    assert "data.download" in str(err.value) or "data_dir" in str(err.value)


def test_bad_view_config_is_an_error():
    with pytest.raises(ValueError, match="blur_p=1.5 is not a probability"):
        ViewConfig(blur_p=1.5)


def test_device_augmentation_turns_uint8_batches_into_views():
    dm = tiny_data(augment="device")
    images, labels = first_batch(dm)
    assert images.dtype == torch.uint8 and images.shape == (32, 3, 16, 16)
    dm.trainer = SimpleNamespace(training=True)
    views, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert [v.shape for v in views] == [(32, 3, 16, 16)] * 2 and views[0].dtype == torch.float32
    assert same_labels is labels


def test_device_augmentation_trains(tmp_path):
    dm = tiny_data(augment="device")
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(tiny_vicreg(dm), dm)
    assert trainer.global_step == 4 and 0 <= trainer.callback_metrics["probe/val_top1"] <= 1


def test_device_augmentation_on_an_image_folder_gets_decode_time_crops(tmp_path):
    # variable-size files: the workers cut the crops (uint8, one tensor per view config), see
    # test_image_folder_crops.py; the device makes the views
    write_folder(tmp_path / "train")
    dm = SSLDataModule(dataset="imagefolder", data_dir=str(tmp_path), labelled=False, augment="device",
                       batch_size=4, num_workers=0, views=[ViewConfig(size=16)] * 2)
    crops, labels, skipped = first_batch(dm)
    assert [tuple(c.shape) for c in crops] == [(4, 1, 3, 16, 16)] * 2 and crops[0].dtype == torch.uint8
    assert [tuple(v.shape) for v in dm.device_views(crops)] == [(4, 3, 16, 16)] * 2

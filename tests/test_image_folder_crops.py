"""Image folders with augment: device: decode-time crops in the workers, BatchedViews on the device.

Checks the crop-box distribution against torchvision's RandomResizedCrop, the crops against
torchvision's crop-then-resize (within 1 uint8 level without DCT reduction; mean under 1 level
with it), determinism and independence from workers and world size, image modes, very large
files, and unreadable files (error naming the file, or skip with deterministic replacement).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import ssl_lightning.data.decode as decode_module
from helpers import tiny_trainer, tiny_vicreg
from ssl_lightning.data.crops import (collate_encoded, crop_boxes, crops_on_device, cut_crops, min_side_ratio,
                                     sample_generator)
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.decode import UnreadableImage, decode, draft_reduction, open_image
from ssl_lightning.data.resumable import ResumableSampler
from ssl_lightning.data.views import ViewConfig

VIEWS = [ViewConfig(size=24, count=2, scale=(0.3, 1.0)), ViewConfig(size=12, count=3, scale=(0.1, 0.4))]


def textured(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth gratings plus grain, so resampling errors show (flat colour would hide them)."""
    y, x = np.mgrid[0:height, 0:width]
    waves = [np.sin(rng.uniform(0.05, 0.3) * (x * math.cos(a) + y * math.sin(a))) for a in rng.uniform(0, 3, 3)]
    image = np.stack(waves, -1) * 80 + 128 + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(root, classes=("a", "b"), per_class=6, suffix="jpg", seed=0, sides=(40, 70)):
    rng = np.random.default_rng(seed)
    files = []
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / "train" / c / f"{i}.{suffix}"
            height, width = rng.integers(*sides, size=2)
            Image.fromarray(textured(rng, int(height), int(width))).save(path, quality=90)
            files.append(path)
    return files


def device_data(root, **kwargs) -> SSLDataModule:
    defaults = dict(dataset="imagefolder", data_dir=str(root), batch_size=4, num_workers=0, augment="device",
                    views=VIEWS, labelled=False)
    return SSLDataModule(**{**defaults, **kwargs})


def test_crop_boxes_follow_torchvision_on_non_square_images():
    # 4000 boxes on a 300 x 200 image vs 4000 of v2.RandomResizedCrop: mean area fraction, log aspect,
    # top and left agree within 4 standard errors (the same check test_batched_views does in memory).
    height, width, n = 200, 300, 4000
    cfg = ViewConfig(size=8, count=n, scale=(0.08, 1.0))
    ours = crop_boxes(width, height, [cfg], sample_generator(0, 0, 0))[0].double()
    torch.manual_seed(0)
    crop, image = v2.RandomResizedCrop(8, scale=cfg.scale, ratio=cfg.ratio), torch.zeros(1, height, width)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (crop.make_params([image]) for _ in range(n))], dtype=torch.float64)
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    for name, f in [("area", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                    ("log ratio", lambda b: (b[:, 3] / b[:, 2]).log()), ("top", lambda b: b[:, 0]),
                    ("left", lambda b: b[:, 1])]:
        a, b = f(ours), f(ref)
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean().item(), b.mean().item())


@pytest.mark.parametrize("suffix, sides, size, scale, max_error, mean_error", [
    # no DCT reduction: torchvision's crop + antialiased resize up to rounding
    ("png", (40, 70), 24, (0.1, 1.0), 1, 0.1),
    # 200-300 px JPEGs, crops >= 4x the output: decoded at 1/2 (or less), then resized. libjpeg's scaled
    # IDCT is not torchvision's filter (and its chroma upsampling differs): measured mean 0.87, max 16
    # levels on these grainy images (misplaced boxes give a mean of ~40)
    ("jpg", (200, 300), 24, (0.5, 1.0), 20, 1.0),
])
def test_crops_match_torchvision_crop_then_resize(tmp_path, suffix, sides, size, scale, max_error, mean_error):
    files = write_folder(tmp_path, per_class=3, suffix=suffix, sides=sides)
    cfg = [ViewConfig(size=size, count=4, scale=scale)]
    errors = []
    for i, path in enumerate(files):
        full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        with open_image(path) as image:
            boxes = crop_boxes(*image.size, cfg, sample_generator(0, 0, i))
            reduction = draft_reduction(image, min_side_ratio(boxes, [size]))
            assert reduction == 1 if suffix == "png" else reduction >= 2
            crops = cut_crops(image, 3, boxes, [size])[0]
        for crop, box in zip(crops, boxes[0].tolist()):
            errors.append((crop.int() - TF.resized_crop(full, *box, [size, size], antialias=True).int()).abs())
    errors = torch.stack(errors).float()
    assert errors.max() <= max_error and errors.mean() < mean_error, (errors.max(), errors.mean())


def test_draft_reduction_keeps_every_crop_a_downscale():
    image = Image.new("RGB", (800, 600))
    image.format = "JPEG"
    # reduce by s only when every crop is still >= 2x its output after it
    ratios = (0.5, 3.9, 4.0, 7.9, 8.0, 15.9, 16.0, 40.0)
    assert [draft_reduction(image, r) for r in ratios] == [1, 1, 2, 2, 4, 4, 8, 8]
    image.format = "PNG"
    assert draft_reduction(image, 40.0) == 1


def test_batch_is_deterministic_and_independent_of_workers_and_ranks(tmp_path):
    write_folder(tmp_path)
    data = device_data(tmp_path)
    data.setup("fit")
    first = next(iter(data.train_dataloader()))
    assert [tuple(t.shape) for t in first[0]] == [(4, 2, 3, 24, 24), (4, 3, 3, 12, 12)]
    assert first[0][0].dtype == torch.uint8 and first[2] == ("",) * 4

    dataset = data.train_set
    keys = list(ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True, keyed=True))
    one = [dataset[k][0] for k in keys]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, [dataset[k][0] for k in keys]))
    # two workers: the same crops for the same keys
    loader = DataLoader(dataset, batch_size=4, num_workers=2,
                        sampler=ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                 drop_last=True, keyed=True))
    batched = [crops for crops, _, _ in loader]
    assert all(torch.equal(batched[i // 4][0][i % 4], one[i][0]) for i in range(len(one)))
    # two ranks: rank r's shard holds exactly the one-process crops of its indices
    for rank in range(2):
        sampler = ResumableSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True, keyed=True)
        for key in sampler:
            assert torch.equal(dataset[key][0][1], one[[k[1] for k in keys].index(key[1])][1])
    # a new epoch draws new crops
    assert not torch.equal(dataset[(1, 0)][0][0], dataset[(0, 0)][0][0])


def test_views_of_crops_use_the_batched_ops(tmp_path):
    write_folder(tmp_path)
    data = device_data(tmp_path)
    data.setup("fit")
    crops, _, _ = next(iter(data.train_dataloader()))
    views = data.device_views(crops, torch.Generator().manual_seed(0))
    again = data.device_views(crops, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert all(torch.equal(a, b) for a, b in zip(views, again)), "seeded views are deterministic"
    # identity config on the crop: exactly the normalised crop (no second resampling on the device)
    identity = device_data(tmp_path, views=[ViewConfig(size=24, count=2, scale=(0.3, 1.0), hflip_p=0.0, jitter_p=0.0,
                                                       grayscale_p=0.0), ViewConfig(size=12, count=3)])
    identity.setup("fit")
    (out, *_) = identity.device_views(crops)
    mean, std = torch.tensor(identity.info.mean).view(1, 3, 1, 1), torch.tensor(identity.info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (crops[0][:, 0].float() / 255 - mean) / std, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="crops for 2 view configs"):
        data.device_views(crops[:1])


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA"])
def test_image_modes_become_the_datasets_channels(tmp_path, mode):
    rgb = Image.fromarray(textured(np.random.default_rng(0), 50, 60))
    path = tmp_path / ("x.png" if mode in ("P", "RGBA", "LA") else "x.jpg")
    (rgb.convert(mode) if mode != "P" else rgb.quantize(16)).save(path)
    with open_image(path) as image:
        crops = cut_crops(image, 3, crop_boxes(*image.size, VIEWS, sample_generator(0, 0, 0)), [24, 12])
    assert [tuple(c.shape) for c in crops] == [(2, 3, 24, 24), (3, 3, 12, 12)]
    with open_image(path) as image:
        assert decode(image, 1).mode == "L"


def test_very_large_jpeg_is_decoded_reduced(tmp_path):
    # 12,000 x 9,000 px (324 MB as RGB): every 224 px crop of scale >= 0.08 is >= 2,500 px a side
    # (> 16 x 224), so the decoder reads it at 1/8: 1,500 x 1,125 px (5 MB).
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (90, 140, 200)).save(path, quality=90)
    cfg = [ViewConfig(size=224, count=2, scale=(0.08, 1.0))]
    with open_image(path) as image:
        boxes = crop_boxes(*image.size, cfg, sample_generator(0, 0, 0))
        reduction = draft_reduction(image, min_side_ratio(boxes, [224]))
        assert reduction == 8
        assert decode(image, 3, reduction).size == (1500, 1125)
    with open_image(path) as image:
        crops = cut_crops(image, 3, boxes, [224])[0]
    assert crops.shape == (2, 3, 224, 224) and (crops[:, 2].float().mean() - 200).abs() < 2


def test_too_large_non_jpeg_is_refused_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(decode_module, "MAX_DECODED_PIXELS", 300 * 200 - 1)
    with open_image(path) as image, pytest.raises(UnreadableImage, match="big.png is 300 x 200 px"):
        decode(image, 3)


def corrupt_files(root):
    """A truncated JPEG, random bytes and a text file, all named like images."""
    good = root / "train" / "a" / "0.jpg"
    (root / "train" / "a" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (root / "train" / "b" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "train" / "b" / "notes.png").write_text("not an image")
    return {"truncated.jpg", "noise.jpg", "notes.png"}


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    write_folder(tmp_path)
    corrupt_files(tmp_path)
    data = device_data(tmp_path)
    data.setup("fit")
    index = [f.name for f in data.train_set.files].index("truncated.jpg")
    with pytest.raises(UnreadableImage, match=r"truncated\.jpg.*on_corrupt: skip"):
        data.train_set[(0, index)]


def test_unreadable_files_are_skipped_deterministically_and_counted(tmp_path, caplog):
    write_folder(tmp_path)
    bad = corrupt_files(tmp_path)
    data = device_data(tmp_path, on_corrupt="skip", batch_size=5, views=[ViewConfig(size=16, count=2)])
    data.setup("fit")
    dataset = data.train_set
    names = [f.name for f in dataset.files]
    # the replacement is the next readable file, cropped with the bad file's own key
    index = names.index("truncated.jpg")
    crops, label, skipped = dataset[(0, index)]
    assert skipped.endswith("truncated.jpg")
    assert all(torch.equal(a, b) for a, b in zip(crops, dataset.crops_of(index + 1, sample_generator(0, 0, index))))
    model = tiny_vicreg(data)
    with caplog.at_level(logging.WARNING, logger="ssl_lightning.data.datamodule"):
        tiny_trainer(tmp_path / "ckpt", max_epochs=2).fit(model, data)
    # 15 files, batch 5: 3 batches an epoch, every file seen once an epoch, so the 3 bad ones each epoch
    assert data.skipped_per_epoch == {0: 3, 1: 3}
    file_lines = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert sorted(line.split()[2].split("/")[-1] for line in file_lines) == sorted(bad), "each file logged once"
    assert [r.getMessage() for r in caplog.records if "unreadable image(s) skipped" in r.getMessage()] == \
        ["epoch 0: 3 unreadable image(s) skipped", "epoch 1: 3 unreadable image(s) skipped"]


def test_skip_needs_the_device_path():
    with pytest.raises(ValueError, match="on_corrupt: skip needs image files read with augment: device"):
        SSLDataModule(dataset="synthetic", on_corrupt="skip")
    with pytest.raises(ValueError, match="on_corrupt 'ignore' is not one of"):
        SSLDataModule(dataset="synthetic", on_corrupt="ignore")


def test_one_class_folder_turns_the_probe_off_and_empty_class_is_an_error(tmp_path):
    write_folder(tmp_path / "one", classes=("only",), per_class=4)
    with pytest.warns(UserWarning, match=r"one class folder \(only\).*probes are off"):
        data = device_data(tmp_path / "one", labelled=True)
    assert data.num_classes == 0
    write_folder(tmp_path / "empty", classes=("a", "b"), per_class=2)
    (tmp_path / "empty" / "train" / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) without images .* c; add images"):
        device_data(tmp_path / "empty", labelled=True)


@pytest.mark.slow
def test_preemption_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """As test_preemption.py, on a JPEG folder with decode-time crops: 16 files, batch 4, so 4 steps an
    epoch; SIGUSR1 during step 6 (mid epoch 1), resume; the weights equal an uninterrupted run's."""
    from ssl_lightning.callbacks import PreemptionHandler
    from test_preemption import SeenSamples, SignalAtStep
    import pytorch_lightning as pl

    write_folder(tmp_path / "data", per_class=8)

    def fit(ckpt_dir, *callbacks, ckpt_path=None):
        pl.seed_everything(0)
        data = device_data(tmp_path / "data", views=[ViewConfig(size=16, scale=(0.3, 1.0), blur_p=0.5)] * 2)
        model = tiny_vicreg(data)
        trainer = tiny_trainer(ckpt_dir)
        trainer.callbacks += [PreemptionHandler(), *callbacks]
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "straight")
    fit(tmp_path / "split", SignalAtStep(6))
    resumed_steps = SeenSamples()
    resumed = fit(tmp_path / "split", resumed_steps, ckpt_path="last")
    assert resumed_steps.steps == [7, 8], "only the rest of the interrupted epoch runs"
    a, b = straight.state_dict(), resumed.state_dict()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ after preemption + resume"


def test_decode_on_the_device_cuts_the_same_crops(tmp_path):
    """data.decode: device (nvJPEG on CUDA; here the CPU decoder, the same code): JPEG bytes go to the
    device, which cuts the same boxes; a PNG and a CMYK JPEG in the batch are still cut in the worker.
    The crops agree with the worker's within 1 uint8 level (no DCT reduction at these crop sizes)."""
    write_folder(tmp_path, per_class=3)
    Image.fromarray(textured(np.random.default_rng(1), 50, 60)).save(tmp_path / "train" / "a" / "png.png")
    Image.fromarray(textured(np.random.default_rng(2), 50, 60)).convert("CMYK").save(tmp_path / "train" / "b" / "k.jpg")
    crops = {}
    for place in ("workers", "device"):
        data = device_data(tmp_path, decode=place, batch_size=8)
        data.setup("fit")
        batch, labels, _ = next(iter(data.train_dataloader()))
        if place == "device":
            assert 0 < len(batch["jpeg"]) < 8, "JPEGs as bytes, the PNG or CMYK file cut in the worker"
            batch = crops_on_device(batch, data.views, 3, torch.device("cpu"))
        crops[place] = batch
    for ours, worker in zip(crops["device"], crops["workers"]):
        assert ours.shape == worker.shape and (ours.int() - worker.int()).abs().max() <= 1


def test_decode_on_the_device_names_a_truncated_jpeg(tmp_path):
    write_folder(tmp_path, per_class=2)
    good = tmp_path / "train" / "a" / "0.jpg"
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # the header survives, half the data does not
    data = device_data(tmp_path, decode="device", batch_size=4)
    data.setup("fit")
    batch, _, _ = next(iter(DataLoader(data.train_set, batch_size=4, collate_fn=collate_encoded,
                                       sampler=[(0, i) for i in range(4)])))
    with pytest.raises(UnreadableImage, match=r"a/0\.jpg\); use data\.decode: workers"):
        crops_on_device(batch, data.views, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="decode: device needs image files read with augment: device"):
        SSLDataModule(dataset="synthetic", decode="device")

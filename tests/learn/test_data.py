import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_crop_folders
from PIL import Image
from torch.utils.data import DataLoader, Subset

from superdml.config.schema import AugmentConfig
from superdml.core.errors import InputError, MissingInputError
from superdml.learn.augment import TrainTransform
from superdml.learn.data import ImageFolderDataset
from superdml.learn.normalization import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    band_statistics,
    imagenet_statistics,
)
from superdml.learn.sampling import PKSampler, stratified_split

NO_AUGMENT = AugmentConfig(
    hflip=False, vflip=False, rot90=False, color_jitter=0.0, random_resized_crop=None
)


@pytest.fixture
def crop_copy(crop_folders: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(crop_folders, tmp_path / "crops"))


# ------------------------------------------------------------------------ dataset


def test_dataset_classes_samples_and_items(crop_folders):
    dataset = ImageFolderDataset(crop_folders, size=40)
    names = ["astronaut", "brick", "chelsea", "coffee", "grass", "gravel"]
    assert dataset.class_names == names
    assert len(dataset) == 6 * 24
    assert dataset.n_skipped == 0
    assert dataset.bands == 3
    assert Counter(dataset.labels) == dict.fromkeys(range(6), 24)
    for path, label in dataset.samples:
        assert path.parent.name == names[label]
    assert dataset.files[30] == f"brick/{dataset.samples[30][0].name}"
    assert sorted(dataset.files) == sorted(
        str(p.relative_to(crop_folders)) for p in crop_folders.glob("*/*.png")
    )
    image, label = dataset[30]
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
    assert label == 1


def test_dataset_keeps_native_size_and_preload_matches_decoding(crop_folders):
    native = ImageFolderDataset(crop_folders, preload=False)
    sides = {native[i][0].shape[-1] for i in range(len(native))}
    assert min(sides) >= 32 and max(sides) <= 64 and len(sides) > 5
    path = native.samples[7][0]
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(native[7][0], expected)
    preloaded = ImageFolderDataset(crop_folders, size=64, preload=True)
    lazy = ImageFolderDataset(crop_folders, size=64, preload=False)
    for i in (0, 50, 143):
        assert torch.equal(preloaded[i][0], lazy[i][0])


def test_rgba_folders_load_four_bands(crop_folders_rgba):
    dataset = ImageFolderDataset(crop_folders_rgba)
    assert dataset.bands == 4
    image, _ = dataset[0]
    assert image.shape == (4, 48, 48)
    assert set(image[3].unique().tolist()) == {0, 255}
    assert ImageFolderDataset(crop_folders_rgba, bands=4).bands == 4


def test_rgb_image_when_four_bands_expected_names_the_file(crop_folders):
    with pytest.raises(InputError, match=r"astronaut_000\.png: has no alpha band.*4 bands"):
        ImageFolderDataset(crop_folders, bands=4)


def test_rgba_image_when_three_bands_expected_names_the_file(crop_folders_rgba):
    with pytest.raises(InputError, match=r"brick_000\.png: has an alpha band.*bands=4"):
        ImageFolderDataset(crop_folders_rgba, bands=3)


def test_grayscale_jpeg_and_tiff_images_load_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for name, suffix in (("a", ".jpg"), ("b", ".tif")):
        (tmp_path / name).mkdir()
        for i in range(3):
            gray = rng.integers(0, 255, (20, 30), dtype=np.uint8)
            Image.fromarray(gray).save(tmp_path / name / f"{i}{suffix}")
    (tmp_path / "a" / "notes.txt").write_text("ignored: not an image suffix")
    dataset = ImageFolderDataset(tmp_path, size=16)
    assert len(dataset) == 6 and dataset.n_skipped == 0
    image, _ = dataset[4]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_corrupt_images_are_skipped_with_one_warning_each(crop_copy, caplog):
    (crop_copy / "brick" / "text.png").write_text("this is not an image\n")
    png = (crop_copy / "grass" / "grass_000.png").read_bytes()
    (crop_copy / "grass" / "truncated.png").write_bytes(png[: len(png) // 2])
    buffer = crop_copy / "coffee" / "whole.jpg"
    Image.open(crop_copy / "coffee" / "coffee_000.png").save(buffer, quality=90)
    jpeg = buffer.read_bytes()
    buffer.unlink()
    (crop_copy / "coffee" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with caplog.at_level(logging.WARNING, logger="superdml"):
        dataset = ImageFolderDataset(crop_copy, size=32)
    assert dataset.n_skipped == 3
    assert len(dataset) == 6 * 24
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name in ("text.png", "truncated.png", "truncated.jpg"):
        assert sum(name in w for w in warnings) == 1
    assert all(w.count("\n") == 0 for w in warnings)


def test_empty_class_folder_is_an_error_naming_it(crop_copy):
    (crop_copy / "zebra").mkdir()
    with pytest.raises(InputError, match=r"zebra: class folder has no readable images"):
        ImageFolderDataset(crop_copy)


def test_class_folder_with_only_corrupt_images_is_an_error(crop_copy, caplog):
    for path in (crop_copy / "gravel").iterdir():
        path.write_bytes(b"\x89PNG broken")
    with caplog.at_level(logging.WARNING, logger="superdml"):
        with pytest.raises(InputError, match=r"gravel: class folder has no readable images"):
            ImageFolderDataset(crop_copy)
    assert len(caplog.records) == 24


def test_single_class_is_an_error_naming_the_root(tmp_path):
    root = make_crop_folders(tmp_path / "one", classes=["brick"], per_class=3, size=32)
    with pytest.raises(InputError, match=r"one: only one class folder \('brick'\)"):
        ImageFolderDataset(root)


def test_no_class_folders_and_missing_root_are_errors(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"no class folders"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(MissingInputError, match=r"nowhere: no such folder"):
        ImageFolderDataset(tmp_path / "nowhere")


# -------------------------------------------------------------------------- split


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_stratified_split_keeps_every_class_in_train(fraction):
    labels = [0] * 1 + [1] * 2 + [2] * 10 + [3] * 37
    train, val = stratified_split(labels, fraction, seed=3)
    assert sorted(train + val) == list(range(len(labels)))
    labels_array = np.array(labels)
    for c, n in enumerate([1, 2, 10, 37]):
        n_train = int(np.sum(labels_array[train] == c))
        n_val = int(np.sum(labels_array[val] == c))
        assert n_train >= 1
        if fraction == 0:
            assert n_val == 0
        elif n >= 2:
            assert 1 <= n_val == max(1, min(round(n * fraction), n - 1))
        else:
            assert n_val == 0


def test_stratified_split_is_seeded_and_accepts_a_dataset(crop_folders):
    dataset = ImageFolderDataset(crop_folders)
    first = stratified_split(dataset, 0.25, seed=1)
    assert first == stratified_split(dataset.labels, 0.25, seed=1)
    assert first != stratified_split(dataset, 0.25, seed=2)
    assert len(first[1]) == 6 * 6


def test_stratified_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1], 1.0)


# ------------------------------------------------------------------------ sampler


def check_epoch(batches, labels, p, k):
    labels = np.asarray(labels)
    seen = set()
    for batch in batches:
        counts = Counter(labels[batch].tolist())
        assert len(batch) == p * k
        assert len(counts) == p
        assert set(counts.values()) == {k}
        seen.update(batch)
    assert seen == set(range(len(labels)))


@pytest.mark.parametrize(
    ("sizes", "p", "k"),
    [([10] * 6, 4, 3), ([1, 3, 50, 7, 2], 2, 4), ([5, 5, 5], 8, 2), ([12, 30], 2, 5)],
)
def test_pk_sampler_visits_every_sample_with_k_per_class(sizes, p, k):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(labels)
    sampler = PKSampler(labels, p, k, seed=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(sampler) == len(batches)
        check_epoch(batches, labels, min(p, len(sizes)), k)


def test_pk_sampler_is_reproducible_per_seed_and_epoch():
    labels = np.repeat(np.arange(7), [9, 4, 20, 6, 6, 13, 2])
    a, b = PKSampler(labels, 3, 4, seed=11), PKSampler(labels, 3, 4, seed=11)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    epoch2 = list(a)
    a.set_epoch(3)
    assert list(a) != epoch2
    a.set_epoch(2)
    assert list(a) == epoch2
    other = PKSampler(labels, 3, 4, seed=12)
    other.set_epoch(2)
    assert list(other) != epoch2


def test_pk_sampler_drives_a_dataloader_with_batched_transforms(crop_folders):
    mean, std = imagenet_statistics(3)
    dataset = ImageFolderDataset(
        crop_folders, size=48, transform=TrainTransform(AugmentConfig(), 48, mean, std)
    )
    sampler = PKSampler(dataset, 4, 6, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(sampler)
    expected = list(sampler)
    for (images, labels), indices in zip(loader, expected, strict=True):
        assert images.shape == (24, 3, 48, 48) and images.dtype == torch.float32
        assert labels.tolist() == [dataset.labels[i] for i in indices]


def test_split_subset_loader_yields_uint8_batches_for_batched_augmentation(crop_folders):
    dataset = ImageFolderDataset(crop_folders, size=32)
    train, _ = stratified_split(dataset, 0.25, seed=0)
    sampler = PKSampler([dataset.labels[i] for i in train], 3, 4, seed=0)
    loader = DataLoader(Subset(dataset, train), batch_sampler=sampler)
    augment = TrainTransform(AugmentConfig(), 32, *imagenet_statistics(3))
    for images, labels in loader:
        assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
        assert sorted(Counter(labels.tolist()).values()) == [4, 4, 4]
        assert augment(images).dtype == torch.float32
    assert len(loader) == len(sampler)


# --------------------------------------------------------------------- transforms


def test_train_transform_without_augmentation_only_normalizes():
    images = torch.randint(0, 256, (3, 4, 32, 32), dtype=torch.uint8)
    out = TrainTransform(NO_AUGMENT, 32, [0.0] * 4, [1.0] * 4)(images)
    torch.testing.assert_close(out, images.float() / 255)


def test_color_jitter_leaves_the_alpha_band_alone():
    images = torch.randint(0, 256, (8, 4, 24, 24), dtype=torch.uint8)
    images[:, 3] = torch.where(torch.rand(8, 24, 24) < 0.5, 0, 255).to(torch.uint8)
    jitter = AugmentConfig(
        hflip=False, vflip=False, rot90=False, color_jitter=0.5, random_resized_crop=None
    )
    mean, std = imagenet_statistics(4)
    out = TrainTransform(jitter, 24, mean, std)(images)
    plain = TrainTransform(NO_AUGMENT, 24, mean, std)(images)
    assert torch.equal(out[:, 3], plain[:, 3])
    assert torch.equal(out[:, 3], (images[:, 3].float() / 255 - 0.5) / 0.5)
    assert (out[:, :3] - plain[:, :3]).abs().amax(dim=(1, 2, 3)).min() > 0.01


def test_a_context_view_gets_the_crops_jitter():
    crop = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    images = torch.cat([crop, crop, crop[:, :1]], 1)  # crop, its copy as context, alpha
    mean, std = imagenet_statistics(7, alpha=True, views=2)
    out = TrainTransform(AugmentConfig(color_jitter=0.5), 24, mean, std, context_band=3)(images)
    torch.testing.assert_close(out[:, 3:6], out[:, :3])
    plain = TrainTransform(NO_AUGMENT, 24, mean, std, context_band=3)(images)
    assert (out[:, :3] - plain[:, :3]).abs().amax(dim=(1, 2, 3)).min() > 0.01


@pytest.mark.parametrize("option", ["hflip", "vflip", "rot90"])
def test_flips_and_rotations_are_exact_and_vary_per_sample(option):
    config = AugmentConfig(
        hflip=option == "hflip",
        vflip=option == "vflip",
        rot90=option == "rot90",
        color_jitter=0.0,
        random_resized_crop=None,
    )
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    out = TrainTransform(config, 16, [0.0] * 3, [1.0] * 3)(
        images, generator=torch.Generator().manual_seed(0)
    )
    x = images.float() / 255
    if option == "rot90":
        candidates = [torch.rot90(x, r, dims=(-2, -1)) for r in range(4)]
    else:
        candidates = [x, x.flip(-1 if option == "hflip" else -2)]
    chosen = []
    for i in range(len(images)):
        matches = [j for j, c in enumerate(candidates) if torch.allclose(out[i], c[i], atol=1e-5)]
        assert len(matches) == 1
        chosen.append(matches[0])
    assert set(chosen) == set(range(len(candidates)))


def test_geometry_is_shared_by_all_bands_including_alpha():
    rgb = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    images = torch.cat([rgb, rgb[:, :1]], 1)  # alpha band = copy of red
    out = TrainTransform(
        AugmentConfig(color_jitter=0.0, random_resized_crop=0.3), 32, [0.0] * 4, [1.0] * 4
    )(images)
    torch.testing.assert_close(out[:, 3], out[:, 0])


def test_random_resized_crop_zooms_into_the_image():
    ramp = torch.linspace(0, 1, 64).expand(8, 1, 64, 64).contiguous()
    config = AugmentConfig(
        hflip=False, vflip=False, rot90=False, color_jitter=0.0, random_resized_crop=0.3
    )
    out = TrainTransform(config, 64, [0.0], [1.0])(ramp, generator=torch.Generator().manual_seed(1))
    rows = out[:, 0, 0]
    assert torch.all(rows[:, 1:] >= rows[:, :-1] - 1e-6)  # no flips: still increasing
    span = rows[:, -1] - rows[:, 0]
    assert torch.all(span >= 0.45) and torch.all(span <= 1.0)
    assert span.min() < 0.95  # some crops zoom in
    assert torch.all(rows >= 0) and torch.all(rows <= 1)


def test_train_transform_is_seeded_and_handles_single_images():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    transform = TrainTransform(AugmentConfig(), 32, *imagenet_statistics(3))
    a = transform(images, generator=torch.Generator().manual_seed(3))
    b = transform(images, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 32, 32)
    assert torch.equal(a, b)
    assert transform(images[0]).shape == (3, 32, 32)


# --------------------------------------------------------------------- statistics


def test_imagenet_statistics():
    assert imagenet_statistics(3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    mean, std = imagenet_statistics(4)
    assert mean[3] == 0.5 and std[3] == 0.5


def test_band_statistics_match_numpy_over_pixels(crop_folders):
    dataset = ImageFolderDataset(crop_folders)
    mean, std = band_statistics(dataset, max_images=None)
    pixels = np.concatenate(
        [dataset[i][0].numpy().reshape(3, -1) for i in range(len(dataset))], axis=1
    )
    np.testing.assert_allclose(mean, pixels.mean(1) / 255, rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(1) / 255, rtol=1e-6)
    sub = band_statistics(dataset, max_images=10)
    assert sub == band_statistics(dataset, max_images=10)
    assert sub != (mean, std)
    train, _ = stratified_split(dataset, 0.5, seed=0)
    assert band_statistics(dataset, indices=train) != (mean, std)


def test_band_statistics_floor_a_constant_band(tmp_path):
    root = make_crop_folders(tmp_path, classes=["brick", "grass"], per_class=2, size=32)
    for path in root.rglob("*.png"):
        rgb = np.asarray(Image.open(path))
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(path)
    mean, std = band_statistics(ImageFolderDataset(root))
    assert mean[3] == 1.0 and std[3] == pytest.approx(1 / 255)

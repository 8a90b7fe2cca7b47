"""MVTec-layout and CIFAR-10 loading, resizing, and the bad-file policy (fail naming the file, or skip)."""

import pickle
import shutil

import cv2
import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.train import data
from tests.train.conftest import write_cifar_batches


@pytest.fixture
def data_copy(sample_data_root, tmp_path):
    """A private copy of the session's sample data that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(sample_data_root, root)
    return root


def test_load_mvtec_train_and_test(sample_data_root):
    train = data.load_mvtec(sample_data_root, "train", (32, 48))
    assert train.images.shape == (12, 32, 48, 3) and train.images.dtype == np.uint8
    assert train.labels.sum() == 0 and train.category_names == ("pill", "weave")
    test = data.load_mvtec(sample_data_root, "test", (32, 48))
    assert len(test) == 12 and test.labels.sum() == 8
    assert test.masks.shape == (12, 32, 48)
    assert not test.masks[test.labels == 0].any()
    assert all(test.masks[i].any() for i in np.nonzero(test.labels)[0])
    item = test[0]
    assert item["image"].shape == (32, 48, 3) and item["mask"].shape == (32, 48)
    assert test.names[0].startswith("pill/test/")


def test_category_subset_and_unknown_category(sample_data_root):
    only = data.load_mvtec(sample_data_root, "test", (64, 64), categories=("weave",))
    assert set(only.categories) == {"weave"}
    full = data.load_mvtec(sample_data_root, "test", (64, 64))
    assert len(full.subset("weave")) == len(only)
    np.testing.assert_array_equal(full.subset("weave").images, only.images)
    with pytest.raises(ReconadError, match="bolt"):
        data.load_mvtec(sample_data_root, "test", (64, 64), categories=("bolt",))


def test_images_are_rgb_in_file_order(sample_data_root):
    path = sample_data_root / "pill" / "train" / "good" / "000.png"
    rgb = data.read_image_rgb(path)
    np.testing.assert_array_equal(rgb, cv2.imread(str(path))[..., ::-1])


def test_not_an_mvtec_folder(tmp_path):
    with pytest.raises(ReconadError, match="MVTec"):
        data.list_categories(tmp_path)
    with pytest.raises(ReconadError, match="does not exist"):
        data.list_categories(tmp_path / "missing")


def _first(root, *parts):
    return sorted((root.joinpath(*parts)).glob("*.png"))[0]


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncate", "empty, truncated or not a format"),
        ("garbage", "empty, truncated or not a format"),
        ("empty", "empty, truncated or not a format"),
    ],
)
def test_bad_train_image_fails_naming_the_file_or_is_skipped(data_copy, damage, match):
    path = _first(data_copy, "weave", "train", "good")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"this is not an image")
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(data.BadFileError, match=match) as error:
        data.load_mvtec(data_copy, "train", (64, 64))
    assert str(path) in str(error.value) and "--skip-bad-files" in str(error.value)
    skipped = data.load_mvtec(data_copy, "train", (64, 64), on_bad_file="skip")
    assert len(skipped) == 11 and len(skipped.skipped) == 1 and str(path) in skipped.skipped[0]


def test_sixteen_bit_and_transparent_images_are_read_as_the_runtime_reads_them(data_copy):
    """Once refused by training alone; now one rule everywhere: 16-bit scaled by its depth, alpha dropped."""
    from reconad.runtime.frames import read_image

    sixteen, rgba_path = _first(data_copy, "weave", "train", "good"), data_copy / "weave" / "train" / "good" / "001.png"
    cv2.imwrite(str(sixteen), np.full((64, 64, 3), 40000, np.uint16))
    rgba = np.full((64, 64, 4), 200, np.uint8)
    rgba[0, 0, 3] = 0
    cv2.imwrite(str(rgba_path), rgba)
    loaded = data.load_mvtec(data_copy, "train", (64, 64))
    assert len(loaded) == 12 and not loaded.skipped
    assert (data.read_image_rgb(sixteen) == round(40000 * 255 / 65535)).all()
    np.testing.assert_array_equal(data.read_image_rgb(rgba_path), read_image(rgba_path))
    assert (data.read_image_rgb(rgba_path) == 200).all()


def test_truncated_jpeg_is_reported(data_copy):
    path = data_copy / "weave" / "train" / "good" / "900.jpg"
    ok, encoded = cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8))
    path.write_bytes(encoded.tobytes()[:-10])
    with pytest.raises(data.BadFileError, match="truncated"):
        data.read_image_rgb(path)


def test_gray_and_opaque_rgba_are_converted(data_copy):
    gray_path = _first(data_copy, "weave", "train", "good")
    cv2.imwrite(str(gray_path), np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8))
    gray = data.read_image_rgb(gray_path)
    assert gray.shape == (64, 64, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba_path = data_copy / "weave" / "train" / "good" / "001.png"
    bgra = np.full((64, 64, 4), 255, np.uint8)
    bgra[..., 0] = 10  # blue in OpenCV's BGRA order
    cv2.imwrite(str(rgba_path), bgra)
    rgb = data.read_image_rgb(rgba_path)
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 2] == 10
    assert len(data.load_mvtec(data_copy, "train", (64, 64))) == 12


def test_missing_mask_and_mask_of_other_size(data_copy):
    mask = _first(data_copy, "pill", "ground_truth", "hole")
    image = data_copy / "pill" / "test" / "hole" / mask.name.replace("_mask", "")
    cv2.imwrite(str(mask), np.zeros((32, 32), np.uint8))
    with pytest.raises(data.BadFileError, match="32x32 but its image is 64x64") as error:
        data.load_mvtec(data_copy, "test", (64, 64))
    assert str(mask) in str(error.value)
    mask.unlink()
    with pytest.raises(data.BadFileError, match="no ground-truth mask") as error:
        data.load_mvtec(data_copy, "test", (64, 64))
    assert str(image) in str(error.value)
    skipped = data.load_mvtec(data_copy, "test", (64, 64), on_bad_file="skip")
    assert len(skipped) == 11 and str(image) in skipped.skipped[0]


def test_masks_resize_nearest_and_stay_binary():
    mask = np.zeros((100, 100), bool)
    mask[10:30, 40:90] = True
    small = data.resize_mask(mask, (50, 50))
    assert small.dtype == bool and small[10, 30] and not small[2, 2]
    image = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert data.resize_image(image, (50, 40)).shape == (50, 40, 3)
    assert data.resize_image(image, (200, 160)).shape == (200, 160, 3)


def test_cifar10_one_versus_rest(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder, np.random.default_rng(0))
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    train = data.load_dataset(tmp_path, "train", (32, 32))
    test = data.load_dataset(tmp_path, "test", (32, 32), normal_classes=(0, 1, 2, 3, 4))
    assert train.labels.sum() == 0 and len(train) > 0
    assert len(test) == 20 and not test.has_masks
    np.testing.assert_array_equal(test.labels, np.array(raw[b"labels"]) >= 5)
    # Channel planes (R then G then B) become HWC: the first pixel's R, G, B.
    np.testing.assert_array_equal(test.images[0, 0, 0], raw[b"data"][0, [0, 1024, 2048]])
    assert set(test.categories) == {"cifar10"}


def test_cifar10_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder, np.random.default_rng(1))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(data.BadFileError, match="not a readable CIFAR-10 batch"):
        data.load_cifar10(folder, "test")
    with pytest.raises(ReconadError, match="proper subset"):
        data.load_cifar10(folder, "train", normal_classes=tuple(range(10)))

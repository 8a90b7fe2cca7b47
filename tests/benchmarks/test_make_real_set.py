import hashlib
import json

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.train.data import load_mvtec


def _dilate(mask, radius):
    import cv2

    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_tiny_set_has_the_mvtec_layout_with_masks(make_real_set, tiny_real_set):
    train = load_mvtec(tiny_real_set, "train", (64, 64))
    test = load_mvtec(tiny_real_set, "test", (64, 64))
    assert train.category_names == ("brick", "gravel") and len(train) == 12
    per_category = 2 + len(make_real_set.DEFECTS)
    assert len(test) == 2 * per_category and test.labels.sum() == 2 * len(make_real_set.DEFECTS)
    assert not test.masks[test.labels == 0].any()
    assert all(m.any() for m in test.masks[test.labels == 1])  # every defect left a mask
    defects = {name.split("/")[2] for name in test.names} - {"good"}
    assert defects == set(make_real_set.DEFECTS)
    info = json.loads((tiny_real_set / "real_set.json").read_text())
    assert info["config"]["image_size"] == 64
    assert info["sources"]["brick"]["licence"] == "CC0-1.0" and len(info["sources"]["brick"]["sha256"]) == 64
    sizes = {r["size"] for r in info["images"] if r["defect"] != "good"}
    assert sizes == {"small"}  # one image per defect: the first size class


def test_defects_change_the_pixels_under_their_masks_only(make_real_set):
    photo = make_real_set.load_photograph(make_real_set.SOURCES["gravel"],
                                          make_real_set.resolve_source(make_real_set.SOURCES["gravel"]))
    source = make_real_set.SOURCES["gravel"]
    for defect in make_real_set.DEFECTS:
        for size in make_real_set.SIZES:
            seed = [7, make_real_set.DEFECTS.index(defect), make_real_set.SIZES.index(size)]
            good, _ = make_real_set.render_image(np.random.default_rng(seed), photo, source, "test", 128)
            # the same crop (the defect's random draws come after the crop's), now with the defect
            image, mask = make_real_set.render_image(np.random.default_rng(seed), photo, source, "test", 128,
                                                     defect, size, [photo[::-1]])
            changed = np.abs(image.astype(int) - good.astype(int)).max(axis=2) > 12
            inside = mask > 0
            assert 0.001 < inside.mean() < 0.25, (defect, size)
            assert changed[inside].mean() > 0.3, (defect, size)  # the defect is visible where the mask is
            far = ~_dilate(inside, 4)
            assert changed[far].mean() < 0.01, (defect, size)  # and nowhere else


def test_same_seed_same_files_and_a_subset_renders_the_same_images(make_real_set, tiny_real_set, tmp_path):
    again = tmp_path / "again"
    make_real_set.write_real_set(again, make_real_set.RealSetConfig.tiny(("gravel",)))
    first, second = _digest(tiny_real_set), _digest(again)
    assert {k: v for k, v in first.items() if k.startswith("gravel/") and "contamination" not in k} == {
        k: v for k, v in second.items() if "contamination" not in k  # contamination borrows other categories
    }
    other_seed = tmp_path / "seed1"
    config = make_real_set.RealSetConfig.tiny(("gravel",))
    make_real_set.write_real_set(other_seed, make_real_set.RealSetConfig(**{**config.__dict__, "seed": 1}))
    assert _digest(other_seed).keys() == second.keys() and _digest(other_seed) != second


def test_train_and_test_rectangles_never_overlap(make_real_set):
    for name, source in make_real_set.SOURCES.items():
        train, test = source.split_rects()
        assert train and test, name
        for a in train:
            for b in test:
                overlap_w = min(a[2], b[2]) - max(a[0], b[0])
                overlap_h = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_w <= 0 or overlap_h <= 0, (name, a, b)


def test_crops_stay_inside_their_split(make_real_set):
    # A photograph whose pixels hold their own coordinates (and a constant that reveals the gain).
    h, w = 300, 500
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    photo = np.stack([xx, yy, np.full_like(xx, 100.0)], axis=-1)
    source = make_real_set.SOURCES["moss"]  # a grid with left-out cells
    rng = np.random.default_rng(0)
    for split, rects in zip(("train", "test"), source.split_rects()):
        for _ in range(100):
            crop = make_real_set._random_crop(rng, photo, rects, 90)
            gain = crop[0, 0, 2] / 100.0
            xs, ys = crop[..., 0] / gain, crop[..., 1] / gain
            assert any(
                xs.min() >= int(x0 * w) - 0.01 and xs.max() <= int(x1 * w) - 1 + 0.01
                and ys.min() >= int(y0 * h) - 0.01 and ys.max() <= int(y1 * h) - 1 + 0.01
                for x0, y0, x1, y1 in rects
            ), split


def test_missing_source_names_the_package_and_refuses_a_full_folder(make_real_set, tiny_real_set, tmp_path):
    source = make_real_set.Source("/nonexistent/photo.jpg", "debian:some-wallpapers", "GPL-2+", "x", 1.0, 64,
                                  ((0, 0, 1, 0.5),), ((0, 0.5, 1, 1),))
    with pytest.raises(ReconadError, match="apt-get install some-wallpapers"):
        make_real_set.resolve_source(source, (tmp_path,))
    with pytest.raises(ReconadError, match="not empty"):
        make_real_set.write_real_set(tiny_real_set, make_real_set.RealSetConfig.tiny())
    with pytest.raises(ReconadError, match="Unknown categories"):
        make_real_set.write_real_set(tmp_path / "x", make_real_set.RealSetConfig.tiny(("marble",)))


def test_cli_exit_code_and_one_line_error(make_real_set, tiny_real_set, capsys):
    assert make_real_set.main([str(tiny_real_set), "--tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--overwrite" in err[0]


def test_every_category_builds_when_its_debian_package_is_installed(make_real_set, tmp_path):
    missing = []
    for name, source in make_real_set.SOURCES.items():
        try:
            make_real_set.resolve_source(source)
        except ReconadError:
            missing.append(source.package.split(":", 1)[1])
    if missing:
        pytest.skip(f"needs the Debian packages {sorted(set(missing))}: apt-get install {' '.join(sorted(set(missing)))}")
    for name, source in make_real_set.SOURCES.items():  # every cell holds a whole window (with its +8% jitter)
        h, w = make_real_set.load_photograph(source, make_real_set.resolve_source(source)).shape[:2]
        for x0, y0, x1, y1 in sum(source.split_rects(), ()):
            assert min(int(x1 * w) - int(x0 * w), int(y1 * h) - int(y0 * h)) >= round(1.08 * source.window), name
    config = make_real_set.RealSetConfig(image_size=64, num_train=2, num_test_good=1, num_per_defect=1)
    summary = make_real_set.write_real_set(tmp_path / "all", config)
    assert summary.categories == make_real_set.CATEGORIES
    test = load_mvtec(tmp_path / "all", "test", (64, 64))
    assert all(m.any() for m in test.masks[test.labels == 1])


def test_the_validation_set_cuts_its_test_images_from_the_training_rectangles(make_real_set, tiny_real_set, tmp_path):
    import dataclasses

    config = dataclasses.replace(make_real_set.RealSetConfig.tiny(), validation=True)
    make_real_set.write_real_set(tmp_path / "val", config)
    ours, real = _digest(tmp_path / "val"), _digest(tiny_real_set)
    train = [k for k in real if "/train/" in k]
    assert train and all(ours[k] == real[k] for k in train)  # the same training goods
    tests = [k for k in real if "/test/" in k]
    assert tests and not {ours[k] for k in tests} & {real[k] for k in tests}  # other test images
    # Every validation test image is a crop of the brick photograph's train band (top two thirds), so none
    # is a crop of its test band: the band boundary is far from where the crops may lie.
    info = json.loads((tmp_path / "val" / "real_set.json").read_text())
    assert info["config"]["validation"] is True
    source = make_real_set.SOURCES["brick"]
    rng = np.random.default_rng([0, make_real_set.CATEGORIES.index("brick"), 1, 0, 1])
    photo = make_real_set.load_photograph(source, make_real_set.resolve_source(source))
    image, _ = make_real_set.render_image(rng, photo, source, "train", 64)
    good = load_mvtec(tmp_path / "val", "test", (64, 64)).subset("brick")
    assert np.array_equal(good.images[list(good.names).index("brick/test/good/000.png")], image)

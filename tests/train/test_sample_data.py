"""The synthetic data set: MVTec layout, determinism per seed, masks that match their defects."""

import hashlib

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.train.sample_data import DEFECT_TYPES, SampleDataConfig, render_sample, write_sample_data

SMALL = SampleDataConfig(image_size=64, num_train=2, num_test_good=1, num_test_per_defect=1)


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_counts(tmp_path):
    summary = write_sample_data(tmp_path / "data", seed=3, config=SMALL)
    root = tmp_path / "data"
    assert summary.num_train == 4 * 2 and summary.num_test == 4 * (1 + len(DEFECT_TYPES))
    for category in SMALL.categories:
        assert len(list((root / category / "train" / "good").glob("*.png"))) == 2
        for defect in DEFECT_TYPES:
            images = sorted((root / category / "test" / defect).glob("*.png"))
            masks = sorted((root / category / "ground_truth" / defect).glob("*_mask.png"))
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
    assert not list(tmp_path.glob(".data-*")), "the staging folder is renamed into place"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    write_sample_data(tmp_path / "a", seed=1, config=SMALL)
    write_sample_data(tmp_path / "b", seed=1, config=SMALL)
    write_sample_data(tmp_path / "c", seed=2, config=SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("category", SMALL.categories)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_have_masks_that_mark_changed_pixels(category, defect):
    size = 128
    good, good_mask = render_sample(category, None, np.random.default_rng([7, 0]), size)
    bad, mask = render_sample(category, defect, np.random.default_rng([7, 0]), size)
    assert not good_mask.any()
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert 0.001 < (mask > 0).mean() < 0.2
    # Same rng stream up to the defect: inside the mask the image changed a lot, outside barely.
    inside = np.abs(bad.astype(int) - good.astype(int))[mask > 0].mean()
    assert inside > 25, f"{defect} on {category} is too faint ({inside:.1f} grey levels)"


def test_refuses_non_empty_folder_without_overwrite(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ReconadError, match="--overwrite"):
        write_sample_data(tmp_path / "data", config=SMALL)
    write_sample_data(tmp_path / "data", config=SMALL, overwrite=True)
    assert not (tmp_path / "data" / "keep.txt").exists()


def test_unknown_category_is_refused(tmp_path):
    with pytest.raises(ReconadError, match="Unknown sample-data categories"):
        write_sample_data(tmp_path / "x", config=SampleDataConfig(categories=("bolt",)))

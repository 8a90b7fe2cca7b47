"""Shared fixtures: a small synthetic data set in the MVTec-AD layout, written once per session."""

import pytest

from reconad.train.sample_data import SampleDataConfig, write_sample_data

TINY_SAMPLE_DATA = SampleDataConfig(
    image_size=64, num_train=6, num_test_good=2, num_test_per_defect=1, categories=("weave", "pill")
)


@pytest.fixture(scope="session")
def sample_data_root(tmp_path_factory):
    """Two categories at 64x64: 6 train goods each; 2 good + 4 defective test images each (with masks)."""
    root = tmp_path_factory.mktemp("sample-data") / "data"
    write_sample_data(root, seed=0, config=TINY_SAMPLE_DATA)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A ModelConfig.tiny() detector with random weights (seed 0), saved as ``<tmp>/tiny-run/model.ckpt``."""
    import torch

    from reconad.model import ModelConfig, build_detector, save_checkpoint

    torch.manual_seed(0)
    detector = build_detector(ModelConfig.tiny()).eval()
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-run" / "model.ckpt"
    return save_checkpoint(detector, path, categories=["weave", "pill"])

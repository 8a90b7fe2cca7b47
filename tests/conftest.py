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
def tiny_checkpoint(tmp_path_factory, sample_data_root):
    """A ModelConfig.tiny() detector with random weights (seed 0) and category centroids fitted on the
    sample data's training images (weave, pill), as ``recon-train fit`` does; ``<tmp>/tiny-run/model.ckpt``."""
    import torch

    from reconad.model import ModelConfig, build_detector, save_checkpoint
    from reconad.train.data import load_mvtec
    from reconad.train.fit import fit_category_head

    torch.manual_seed(0)
    config = ModelConfig.tiny()
    detector = build_detector(config).eval()
    train_set = load_mvtec(sample_data_root, "train", config.input_hw, ("weave", "pill"))
    head = fit_category_head(detector, train_set, None, 4, torch.device("cpu"), sample_data_root)
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-run" / "model.ckpt"
    return save_checkpoint(detector, path, categories=["weave", "pill"], category_head=head)


@pytest.fixture(scope="session")
def legacy_checkpoint(tmp_path_factory):
    """The same tiny detector as written before the category head: no centroids in its weights at all."""
    import torch

    from reconad.model import ModelConfig, build_detector, save_checkpoint

    torch.manual_seed(0)
    detector = build_detector(ModelConfig.tiny()).eval()
    path = save_checkpoint(detector, tmp_path_factory.mktemp("checkpoints") / "old-run" / "model.ckpt", categories=["weave"])
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["category_centroids"]
    torch.save(payload, path)
    return path

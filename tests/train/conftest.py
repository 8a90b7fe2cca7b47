import pytest

from reconad.train.config import TrainConfig
from reconad.train.fit import fit


def tiny_train_config(**changes) -> TrainConfig:
    """The test-sized model with a random backbone: a few seconds per run on two CPU cores."""
    values = dict(preset="tiny", backbone_weights="none", epochs=1, batch_size=4, val_every_epochs=0, device="cpu")
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_run(sample_data_root, tmp_path_factory):
    """A tiny model fitted for one epoch on the session's sample data: the FitResult."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    return fit(sample_data_root, run_dir, tiny_train_config())

import pickle

import numpy as np
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


def write_cifar_batches(folder, rng, n_per_batch=20):
    """Small stand-ins for cifar-10-batches-py: the same pickled dicts, fewer images."""
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

"""DDP on CPU: two gloo processes train a few steps; their parameters stay identical, only rank 0 writes."""

import os
import socket

import torch
import torch.multiprocessing as mp

from reconad.model import ModelConfig, build_detector
from tests.train.conftest import tiny_train_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, data_root: str, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    from reconad.train.fit import fit

    # Every rank gets its own --out so the test can see which ranks wrote anything.
    config = tiny_train_config(epochs=2, batch_size=2, val_every_epochs=1, select_on="test", keep_resume=True)
    result = fit(data_root, f"{tmp}/run-rank{rank}", config)
    torch.save({k: v.detach().clone() for k, v in result.detector.reconstructor.state_dict().items()},
               f"{tmp}/params-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_keep_identical_parameters(sample_data_root, tmp_path):
    mp.start_processes(
        _worker, args=(2, _free_port(), str(sample_data_root), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    rank0 = torch.load(tmp_path / "params-rank0.pt")
    rank1 = torch.load(tmp_path / "params-rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    torch.manual_seed(0)  # fit seeds the initial weights with TrainConfig.seed = 0
    initial = build_detector(ModelConfig.tiny()).reconstructor.state_dict()
    moved = [name for name in rank0 if not torch.equal(rank0[name], initial[name])]
    assert "input_proj.weight" in moved, "the ranks trained"
    assert torch.load(tmp_path / "run-rank0" / "resume.pt", weights_only=True)["epoch"] == 2
    assert (tmp_path / "run-rank0" / "model.ckpt").is_file()
    assert not (tmp_path / "run-rank1").exists(), "only rank 0 writes"
    # 12 images, 2 ranks x batch 2: 3 steps per epoch per rank; the log counts all 12 images once.
    log = (tmp_path / "run-rank0" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"val"' in log[0]

import pytest
import torch

from reconad.model import ModelConfig, build_detector


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture
def tiny_detector(tiny_config):
    torch.manual_seed(0)
    return build_detector(tiny_config).eval()


def random_images(config: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *config.input_hw, 3), dtype=torch.uint8, generator=generator)

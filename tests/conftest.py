import pytest
import torch

from hf_dmsae import DMSAEConfig, DMSAEModel


def tiny_config(**overrides) -> DMSAEConfig:
    """A small DMSAE config: 16-d inputs, 128 latents, a core of 8."""
    core_size = overrides.pop("core_size", 8)
    settings = dict(d_in=16, dict_size=128, core_size=core_size, k=8, core_ids=[f"cycle0:{i}" for i in range(core_size)])
    settings.update(overrides)
    return DMSAEConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> DMSAEModel:
    """A DMSAE with a random frozen core (fixed seed)."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    core_rows = torch.randn(config.core_size, config.d_in)
    return DMSAEModel.from_core(config, core_rows, config.core_ids)


@pytest.fixture
def model() -> DMSAEModel:
    return tiny_model()

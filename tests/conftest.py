import os

import pytest

os.environ.setdefault("FEDCONDENSE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers, each with every core's thread, and idle OpenMP threads
    # sleep instead of spinning: when one worker waits (a Flower timeout, a cache lock) the other gets
    # both cores; when both compute they share them (two spinning 2-thread workers: 1.2 s per ConvNet-3
    # step instead of 0.7-0.9 s; docs/results.md). Flower processes inherit the policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session trains its own (tiny) checkpoints: nothing leaks from ~/.cache. Under
    pytest-xdist the workers of one session share that cache (`shared/cache.py` locks each entry)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    os.environ["FEDCONDENSE_CACHE"] = str(root / "cache")
    yield


@pytest.fixture(scope="session")
def tiny_models():
    """Untrained but real models at test scale (shapes, determinism)."""
    import torch
    from shared.config import ChainConfig
    from shared.models.first_encoder import Decoder, FirstEncoder
    from shared.models.noise_estimators import NoiseEstimators
    from shared.models.second_encoder import SecondEncoder
    torch.manual_seed(0)
    cfg = ChainConfig(T=4, unet_channels=(16, 32), second_encoder_channels=32, cross_attention_dim=32)
    return cfg, {
        "first_encoder": FirstEncoder(1, 4, (16, 32)).eval(),
        "decoder": Decoder(1, 4, (32, 16, 16)).eval(),
        "second_encoder": SecondEncoder(4, 32, 4, 32).eval(),
        "noise_estimators": NoiseEstimators(4, "separate", 4, 8, (16, 32), 32).eval(),
    }

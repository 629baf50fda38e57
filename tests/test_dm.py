"""The DM baseline (benchmarks/dm.py): it optimises what the paper says it optimises."""
import pytest
import torch

from benchmarks.dm import distribution_matching
from shared.config import DataConfig
from shared.data import load_dataset
from shared.models.students import ConvNet


def mean_embedding_gap(images, labels, syn, syn_labels, seeds=(101, 102, 103)) -> float:
    """The DM objective without augmentation, averaged over a few fixed random ConvNets."""
    total = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        net = ConvNet(1, 10, 128, 3, 32).eval()
        with torch.no_grad():
            for c in labels.unique():
                real = net.features(images[labels == c]).flatten(1).mean(0)
                fake = net.features(syn[syn_labels == c]).flatten(1).mean(0)
                total += float((real - fake).pow(2).sum())
    return total / len(seeds)


@pytest.fixture(scope="module")
def real():
    ds = load_dataset(DataConfig(public_size=100, train_limit=600, test_limit=10))
    return ds.private.images, ds.private.labels


def test_dm_returns_ipc_images_per_class_from_real_initialisation(real):
    images, labels = real
    out = distribution_matching(images, labels, ipc=2, iterations=0, device=torch.device("cpu"))
    assert out["images"].shape == (20, 1, 32, 32)
    assert torch.bincount(out["labels"], minlength=10).tolist() == [2] * 10
    for img, lab in zip(out["images"], out["labels"]):      # each starts as a real image of its class
        assert ((images[labels == lab] - img).abs().flatten(1).max(1).values < 1e-6).any()


def test_dm_reduces_the_mean_embedding_gap(real):
    images, labels = real
    start = distribution_matching(images, labels, ipc=2, iterations=0, device=torch.device("cpu"))
    done = distribution_matching(images, labels, ipc=2, iterations=30, device=torch.device("cpu"), real_batch=24)
    first, last = sum(done["losses"][:5]) / 5, sum(done["losses"][-5:]) / 5
    assert last < 0.8 * first, (first, last)                 # the training objective falls
    before = mean_embedding_gap(images, labels, start["images"], start["labels"])
    after = mean_embedding_gap(images, labels, done["images"], done["labels"])
    assert after < before, (before, after)                     # and so does the gap under unseen random nets
    assert done["images"].min() >= -1 and done["images"].max() <= 1


def test_dm_rejects_ipc_above_real_batch(real):
    images, labels = real
    with pytest.raises(ValueError, match="real batch"):
        distribution_matching(images, labels, ipc=80, iterations=1, device=torch.device("cpu"), real_batch=64)

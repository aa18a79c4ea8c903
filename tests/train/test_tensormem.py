"""TensorPeak counts live tensor storages like a GPU allocator's max_memory_allocated would."""

import torch

from slmtune.train.tensormem import TensorPeak

MB = 2**20


def test_counts_allocations_frees_and_views_once():
    with TensorPeak() as mem:
        a = torch.zeros(MB // 4)  # 1 MB of float32
        b = torch.zeros(2 * MB // 4)
        view = b[10:]  # same storage: not counted again
        assert mem.live == 3 * MB
        del a
        c = torch.ones(MB // 4)  # reuses the freed MB: peak stays at 3 MB
        assert mem.live == 3 * MB and mem.peak == 3 * MB
        d = b + 1  # a new 2 MB result
        assert mem.peak == 5 * MB
        del b, view, c, d
    assert mem.live == 0 and mem.peak_mb == 5.0


def test_tracks_existing_weights_and_autograd_activations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    weights = sum(p.numel() * 4 for p in model.parameters())
    x = torch.randn(64, 256)
    with TensorPeak() as mem:
        mem.track(model)
        assert mem.live == weights
        model(x).sum().backward()
    # during the forward both 64×1024 hidden tensors (Linear output, ReLU output) were alive beside the weights
    assert mem.peak >= weights + 2 * 64 * 1024 * 4
    assert mem.live == 2 * weights  # weights + their .grad

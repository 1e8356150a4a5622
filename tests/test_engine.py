"""The window engine equals MONAI's sliding-window inference and its gradient equals full autograd."""

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet

from medis3d.engine import WindowEngine, WindowSettings


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8).eval()


CASES = [
    # shape, roi, overlap, mode, padding mode (the second case is smaller than the window: padded)
    ((37, 40, 29), (24, 24, 24), 0.5, "gaussian", "constant"),
    ((20, 40, 29), (24, 24, 24), 0.25, "constant", "replicate"),
]


@pytest.mark.parametrize("shape,roi,overlap,mode,padding", CASES)
def test_forward_equals_monai(net, shape, roi, overlap, mode, padding):
    engine = WindowEngine(net, WindowSettings(roi, sw_batch_size=3, overlap=overlap, mode=mode, padding_mode=padding))
    x = torch.randn(2, 1, *shape)
    expected = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode=mode, padding_mode=padding)
    assert torch.allclose(engine.forward(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,roi,overlap,mode,padding", CASES)
def test_input_gradient_equals_full_autograd(net, shape, roi, overlap, mode, padding):
    engine = WindowEngine(net, WindowSettings(roi, sw_batch_size=3, overlap=overlap, mode=mode, padding_mode=padding))
    x = torch.randn(1, 1, *shape)
    upstream = torch.randn(1, 2, *shape)
    leaf = x.clone().requires_grad_(True)
    full = sliding_window_inference(leaf, roi, 3, net, overlap=overlap, mode=mode, padding_mode=padding)
    (expected,) = torch.autograd.grad((full * upstream).sum(), leaf)
    got = engine.input_gradient(x, upstream)
    rel = (got - expected).norm() / expected.norm()
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("window_batch", [2, 8])  # 8 windows in all: two passes, or one pass with its graph
def test_value_and_grad_of_a_global_loss(net, window_batch):
    """A Dice-like loss over the whole stitched volume gets the same gradient as full autograd."""
    engine = WindowEngine(net, WindowSettings((24, 24, 24), sw_batch_size=window_batch, overlap=0.5, mode="gaussian"))
    assert engine.fits_one_batch(torch.zeros(1, 1, 30, 30, 30)) == (window_batch == 8)
    x = torch.randn(1, 1, 30, 30, 30)

    def loss(logits):
        p = torch.softmax(logits, 1)[:, 1]
        return 1 - 2 * (p * (x[:, 0] > 0)).sum() / (p.sum() + (x[:, 0] > 0).sum())

    leaf = x.clone().requires_grad_(True)
    full = sliding_window_inference(leaf, (24, 24, 24), 2, net, overlap=0.5, mode="gaussian")
    (expected,) = torch.autograd.grad(loss(full), leaf)
    stitched, value, grad = engine.value_and_grad(x, loss)
    assert torch.allclose(value, loss(full).detach(), atol=1e-6)
    assert (grad - expected).norm() / expected.norm() <= 1e-4

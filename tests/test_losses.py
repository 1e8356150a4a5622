"""Surrogate losses: finite, informative gradients in both activations, and attacks with each lower Dice."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medis3d.losses import COMBINED_WEIGHTS, LOSSES, PAPER_LOSSES, get_loss, parse_losses

ACTIVATIONS = ["softmax", "sigmoid"]


def _case(activation: str, empty_foreground: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    channels = 3 if activation == "softmax" else 2
    logits = torch.randn(2, channels, 10, 12, 8, generator=g)
    if activation == "softmax":
        target = torch.randint(0, channels, (2, 1, 10, 12, 8), generator=g)
        if empty_foreground:
            target[target == 2] = 0  # class 2 absent
    else:
        target = (torch.rand(2, channels, 10, 12, 8, generator=g) > 0.6).float()
        if empty_foreground:
            target[:, 1] = 0
    return logits, target


def _agreeing(target: torch.Tensor, activation: str, channels: int) -> torch.Tensor:
    onehot = F.one_hot(target[:, 0], channels).movedim(-1, 1).float() if activation == "softmax" else target
    return onehot * 8 - 4


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("empty", [False, True])
def test_finite_nonzero_gradient(name, activation, empty):
    logits, target = _case(activation, empty)
    logits.requires_grad_(True)
    value = get_loss(name, activation)(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_lower_when_prediction_agrees(name, activation):
    logits, target = _case(activation)
    fn = get_loss(name, activation)
    good = _agreeing(target, activation, logits.shape[1])
    assert fn(good, target) < fn(-good, target)
    assert fn(good, target) < fn(logits, target)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_combined_is_the_weighted_sum(activation):
    logits, target = _case(activation)
    parts = sum(w * get_loss(n, activation)(logits, target) for n, w in COMBINED_WEIGHTS.items())
    assert torch.allclose(get_loss("combined", activation)(logits, target), parts, atol=1e-6)
    assert list(COMBINED_WEIGHTS.values()) == [0.21, 0.18, 0.20, 0.15, 0.26]


def test_parse_losses():
    assert parse_losses("all") == list(PAPER_LOSSES) == ["logcosh_dice", "bce_dice", "exp_log", "structure", "lovasz", "combined"]
    assert parse_losses(" dice, ce ,dice") == ["dice", "ce"]
    assert parse_losses(["focal", "tversky"]) == ["focal", "tversky"]
    with pytest.raises(ValueError, match="unknown loss 'wobble'.*choose from"):
        parse_losses("dice,wobble")
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")


@pytest.fixture(scope="module")
def tiny_segmenter():
    """A 2-layer conv net trained for a few seconds to segment bright blobs in a 24^3 volume."""
    from monai.data import create_test_image_3d

    torch.manual_seed(0)
    image, seg = create_test_image_3d(24, 24, 24, num_objs=4, rad_max=6, rad_min=3, noise_max=0.1, random_state=np.random.RandomState(0))
    x = torch.from_numpy(image)[None, None].float()
    y = torch.from_numpy((seg > 0).astype(np.int64))[None, None]
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y[:, 0]).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, x


def _dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()).clamp_min(1))


@pytest.mark.parametrize("name", list(LOSSES))
def test_iterative_attack_with_each_loss_lowers_dice(tiny_segmenter, name):
    net, x = tiny_segmenter
    clean = net(x).argmax(1, keepdim=True)
    assert _dice(clean == 1, clean == 1) == 1.0 and clean.sum() > 50
    loss = get_loss(name, "softmax")
    eps, step = 16 / 255, 2 / 255
    adv = x.clone()
    for _ in range(10):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(net(adv), clean), adv)
        adv = (x + (adv.detach() + step * grad.sign() - x).clamp(-eps, eps)).detach()
    attacked = net(adv).argmax(1, keepdim=True)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert _dice(attacked == 1, clean == 1) < 0.95

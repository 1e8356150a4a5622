"""Surrogate losses: finite, informative gradients for both activations, the right ordering, the
paper's combination, name parsing, and an iterative attack that lowers Dice with every loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medis3d.losses import (
    COMBINED_WEIGHTS,
    LOSSES,
    PAPER_LOSSES,
    STOPS_AT_FLIPPED,
    _lovasz_extension,
    get_loss,
    parse_losses,
    structure_kernel,
)

ACTIVATIONS = ["softmax", "sigmoid"]
SHAPE = (10, 12, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny volumes run fastest on one thread (and the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _case(activation: str, kind: str = "random", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a target: ``random``, ``empty`` (one foreground class absent) or ``uniform`` (one class only)."""
    g = torch.Generator().manual_seed(seed)
    channels = 3 if activation == "softmax" else 2
    logits = torch.randn(2, channels, *SHAPE, generator=g)
    if activation == "softmax":
        target = torch.randint(0, channels, (2, 1, *SHAPE), generator=g)
        if kind == "empty":
            target[target == 2] = 0
        elif kind == "uniform":
            target.zero_()  # background only
    else:
        target = (torch.rand(2, channels, *SHAPE, generator=g) > 0.6).float()
        if kind == "empty":
            target[:, 1] = 0
        elif kind == "uniform":
            target.zero_()
    return logits, target


def _agreeing_logits(target: torch.Tensor, activation: str, channels: int, margin: float = 4.0) -> torch.Tensor:
    """Logits whose prediction is exactly ``target``, confident but not saturated."""
    onehot = F.one_hot(target[:, 0], channels).movedim(-1, 1).float() if activation == "softmax" else target.float()
    return (2 * onehot - 1) * margin


@pytest.mark.parametrize("kind", ["random", "empty", "uniform"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_scalar_and_nonzero_gradient(name, activation, kind):
    logits, target = _case(activation, kind)
    logits.requires_grad_(True)
    value = get_loss(name, activation)(logits, target)
    assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_informative_at_a_perfect_prediction(name, activation):
    """A targeted attack descends towards a mask the model already nearly predicts: no flat spot."""
    _, target = _case(activation)
    logits = _agreeing_logits(target, activation, 3 if activation == "softmax" else 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(get_loss(name, activation)(logits, target), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_for_saturated_logits(name, activation):
    """Probabilities of exactly 0 and 1 in float32 (logs of 0, x**0.3 at 0) stay finite."""
    _, target = _case(activation, "empty")
    good = _agreeing_logits(target, activation, 3 if activation == "softmax" else 2, margin=200.0)
    for logits in (good, -good):
        logits = logits.clone().requires_grad_(True)
        value = get_loss(name, activation)(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


MONOTONE = [name for name in LOSSES if name not in STOPS_AT_FLIPPED]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", MONOTONE)
def test_lower_when_prediction_agrees(name, activation):
    logits, target = _case(activation)
    fn = get_loss(name, activation)
    good = _agreeing_logits(target, activation, logits.shape[1])
    assert fn(good, target) < fn(logits, target) < fn(-good, target)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", sorted(STOPS_AT_FLIPPED))
def test_masked_losses_pull_only_on_voxels_still_to_change(name, activation):
    """SegPGD (at its first step) and SEA's masked losses: a flipped voxel neither counts nor pulls; CosPGD:
    a voxel flipped with confidence hardly pulls. A voxel still right pulls; less confidence on the right
    voxels is a higher loss (the spherical loss is scale-free instead: confidence alone does not move it)."""
    logits, target = _case(activation)
    channels = logits.shape[1]
    fn = get_loss(name, activation)
    logits = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(logits, target), logits)
    if activation == "softmax":
        right = logits.detach().argmax(1) == target[:, 0]
        per_voxel = grad.abs().sum(1)
    else:
        right = (logits.detach() > 0) == (target > 0.5)
        per_voxel = grad.abs()
    assert per_voxel[right].sum() > 0
    if name != "cospgd":
        assert per_voxel[~right].sum() == 0
    good = _agreeing_logits(target, activation, channels, margin=4.0)
    unsure = _agreeing_logits(target, activation, channels, margin=0.5)
    if name.startswith("masked_spherical") and activation == "softmax":
        assert torch.isclose(fn(good, target), fn(unsure, target))
    else:
        assert fn(good, target) < fn(unsure, target)
    flipped = -_agreeing_logits(target, activation, channels, margin=8.0)
    assert abs(float(fn(flipped, target))) < (1e-2 if name == "cospgd" else 1e-12)  # all flipped: nothing left to pull


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_two_dimensional_slices(name, activation):
    """The same losses on 2D logits ``(B, C, H, W)`` (structure then pools 31x31, shrunk to the image)."""
    logits, target = _case(activation)
    logits2d, target2d = logits[..., 0].clone().requires_grad_(True), target[..., 0]
    fn = get_loss(name, activation)
    (grad,) = torch.autograd.grad(fn(logits2d, target2d), logits2d)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    good = _agreeing_logits(target2d, activation, logits.shape[1])
    if name in STOPS_AT_FLIPPED:  # nothing left to pull on once every voxel is flipped
        flipped = -_agreeing_logits(target2d, activation, logits.shape[1], margin=8.0)
        assert float(fn(flipped, target2d)) == pytest.approx(0.0, abs=1e-2)
        assert fn(logits2d, target2d) != 0
    else:
        assert fn(good, target2d) < fn(-good, target2d)


@pytest.mark.parametrize("name", ["combined", "lovasz", "exp_log", "structure"])
def test_float32_under_autocast(name):
    logits, target = _case("softmax")
    fn = get_loss(name, "softmax")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    assert torch.allclose(value, fn(logits.bfloat16().float(), target), atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_combined_is_the_weighted_sum(activation):
    logits, target = _case(activation)
    parts = sum(w * get_loss(n, activation)(logits, target) for n, w in COMBINED_WEIGHTS.items())
    assert torch.allclose(get_loss("combined", activation)(logits, target), parts, atol=1e-6)
    assert COMBINED_WEIGHTS == {"logcosh_dice": 0.21, "bce_dice": 0.18, "exp_log": 0.20, "structure": 0.15, "lovasz": 0.26}


def test_lovasz_extension_is_the_jaccard_loss_on_hard_mistakes():
    """On 0/1 errors (a mistake mask) the Lovasz extension equals the Jaccard loss it extends."""
    g = torch.Generator().manual_seed(1)
    truth = (torch.rand(5, 200, generator=g) > 0.7).float()
    mistakes = (torch.rand(5, 200, generator=g) > 0.8).float()
    prediction = torch.where(mistakes > 0, 1 - truth, truth)
    inter = (prediction * truth).sum(1)
    union = ((prediction + truth) > 0).float().sum(1)
    assert torch.allclose(_lovasz_extension(mistakes, truth), 1 - inter / union, atol=1e-6)


def test_exp_log_matches_its_formula():
    logits, target = _case("softmax", seed=3)
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    dice = (2 * (probs * onehot).sum((2, 3, 4)) + 1) / (probs.sum((2, 3, 4)) + onehot.sum((2, 3, 4)) + 1)
    freq = onehot.sum((0, 2, 3, 4))
    weight = ((freq.sum() / freq) ** 0.5)[target[:, 0]]
    p_true = (probs * onehot).sum(1)
    expected = 0.8 * ((-dice[:, 1:].log()) ** 0.3).mean() + 0.2 * (weight * (-p_true.log()) ** 0.3).mean()
    assert torch.allclose(get_loss("exp_log", "softmax")(logits, target), expected, atol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_js_is_the_divergence_over_every_class(activation):
    """The closed form (the target class's probability alone) is the Jensen-Shannon divergence summed over the
    classes (sigmoid: over each channel's two classes), in value and in gradient."""
    logits, target = _case(activation, seed=4)
    logits = (4 * logits.double()).requires_grad_(True)
    if activation == "softmax":
        p, q = torch.softmax(logits, 1), F.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    else:
        s, y = torch.sigmoid(logits), target.double()
        p, q = torch.stack([1 - s, s], 1), torch.stack([1 - y, y], 1)
    m = (p + q) / 2
    kl = (p * (p.log() - m.log())).sum(1) + torch.where(q > 0, q * (q.clamp_min(1e-300).log() - m.log()), 0).sum(1)
    expected = (kl / 2).mean()
    ours = get_loss("js", activation)(logits, target)  # float32 inside, as every loss
    assert abs(float(ours) - float(expected)) < 1e-6
    g_ours = torch.autograd.grad(get_loss("js", activation)(logits, target), logits)[0]
    g_expected = torch.autograd.grad(expected, logits)[0]
    assert torch.allclose(g_ours.double(), g_expected, atol=1e-7 * float(g_expected.abs().max()) + 1e-9, rtol=1e-4)


def test_structure_kernel():
    assert structure_kernel(2) == 31 and structure_kernel(3) == 11
    assert abs(11**3 - 31**2) / 31**2 < 0.4


def test_generalized_dice_without_foreground_stays_informative():
    logits, target = _case("softmax", "uniform")
    logits.requires_grad_(True)
    value = get_loss("generalized_dice", "softmax")(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    assert value > 0.5 and (grad[:, 0] < 0).all()  # raising background anywhere lowers the loss
    from monai.losses import GeneralizedDiceLoss  # MONAI alone is flat here: all class weights infinite

    raw = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, include_background=False)(logits, target)
    assert torch.autograd.grad(raw, logits)[0].abs().sum() == 0


def test_get_loss_errors():
    with pytest.raises(ValueError, match=r"unknown loss 'nope'; choose from: logcosh_dice, .*, ce"):
        get_loss("nope")
    with pytest.raises(ValueError, match="activation"):
        get_loss("dice", "relu")


def test_parse_losses():
    assert parse_losses("all") == list(PAPER_LOSSES) == ["logcosh_dice", "bce_dice", "exp_log", "structure", "lovasz", "combined"]
    assert parse_losses(" dice, ce ,dice") == ["dice", "ce"]
    assert parse_losses(["focal", "tversky", "focal"]) == ["focal", "tversky"]
    assert parse_losses("ce,all") == ["ce", *PAPER_LOSSES]
    with pytest.raises(ValueError, match=r"unknown loss 'wobble'; choose from: .*generalized_dice"):
        parse_losses("dice,wobble")
    with pytest.raises(ValueError, match="no loss"):
        parse_losses(" , ")


# -- end to end: a tiny trained segmenter and the paper's iterative attack ------------------------
@pytest.fixture(scope="module")
def tiny_segmenter(one_thread):
    """A 2-layer conv net trained for about a second to segment bright blobs in a 24^3 volume."""
    from monai.data import create_test_image_3d

    torch.manual_seed(0)
    image, seg = create_test_image_3d(24, 24, 24, num_objs=4, rad_max=6, rad_min=3, noise_max=0.1,
                                      random_state=np.random.RandomState(0))
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
    with torch.no_grad():
        prediction = net(x).argmax(1)
    assert _dice(prediction == 1, y[:, 0] == 1) > 0.8  # it did learn the blobs
    return net, x


def _dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()).clamp_min(1))


@pytest.mark.parametrize("name", list(LOSSES))
def test_iterative_attack_with_each_loss_lowers_dice(tiny_segmenter, name):
    """10 BIM steps of 2/255 of the intensity range, L-inf budget 8/255, against the clean prediction."""
    net, x = tiny_segmenter
    with torch.no_grad():
        clean = net(x).argmax(1, keepdim=True)
    assert clean.sum() > 50
    loss = get_loss(name, "softmax")
    span = float(x.max() - x.min())
    eps, step = 8 / 255 * span, 2 / 255 * span
    adv = x.clone()
    for _ in range(10):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(net(adv), clean), adv)
        adv = (x + (adv.detach() + step * grad.sign() - x).clamp(-eps, eps)).detach()
    with torch.no_grad():
        attacked = net(adv).argmax(1, keepdim=True)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert _dice(clean == 1, clean == 1) == 1.0
    assert _dice(attacked == 1, clean == 1) < 0.99  # each loss drops it to about 0.95 here


def test_margin_stops_pulling_on_flipped_voxels_and_balances_classes():
    """Voxels wrong by more than the cap get no gradient; every class present weighs the same."""
    from medis3d.losses import MARGIN_CAP

    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[..., 0, 0, 0] = 1  # a one-voxel class beside 63 background voxels
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 0] = 2.0  # background right by a margin of 2...
    logits[0, 0, 0, 0, 1], logits[0, 1, 0, 0, 1] = -5.0, 5.0  # ...except one voxel already wrong by 10
    logits[0, 1, 0, 0, 0] = 3.0  # the small class right by 1
    logits.requires_grad_(True)
    loss = get_loss("margin", "softmax")(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, :, 0, 0, 1].abs().sum() == 0  # flipped beyond the cap: no pull
    # the single small-class voxel pulls as hard as all 63 background voxels together (62 still pulling)
    small = grad[0, :, 0, 0, 0].abs().sum()
    background = grad[0].abs().sum() - small
    assert torch.isclose(background, small * 62 / 63)
    expected = ((-1.0) + (62 * -2.0 + MARGIN_CAP) / 63) / 2  # mean over classes of the capped gaps
    assert float(loss) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_targeted_margin_pulls_on_voxels_far_from_the_target_and_stops_once_on_it(activation):
    """A targeted attack descends the margin towards its target: voxels off target by more than the cap must pull
    (capped as untargeted they were flat, and a targeted `apgd:margin` left the structure whole), and a voxel on
    target by more than the cap stops pulling."""
    target = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)  # the aim: background everywhere
    logits = torch.zeros(1, 2, 2, 2, 2)
    logits[0, 1, 0] = 5.0  # half the voxels far from the aim (foreground by 5)
    logits[0, 0, 1] = 5.0  # the other half on the aim by 5
    if activation == "sigmoid":
        target, logits = target.float(), logits[:, 1:] - logits[:, :1]
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(get_loss("margin", activation)(logits, target, 0, 1, True), logits)
    assert grad[:, :, 0].abs().sum() > 0  # far from the aim: pulls
    assert grad[:, :, 1].abs().sum() == 0  # on the aim beyond the cap: stops
    (untargeted,) = torch.autograd.grad(get_loss("margin", activation)(logits, target), logits)
    assert untargeted[:, :, 0].abs().sum() == 0 and untargeted[:, :, 1].abs().sum() > 0  # the untargeted cap is the other side


def test_class_balanced_masked_ce_weighs_each_sigmoid_label_by_its_own_size():
    """Each label of a multi-label (sigmoid) model is its own class: a 10-voxel label pulls as hard in all as a
    1000-voxel one, so each of its voxels 100 times as hard. The labels' voxels were pooled into one class (ratio 1;
    measured on a two-label model, PGD 25 HU: the small label's Dice 0.750 pooled, 0.504 balanced)."""
    target = torch.zeros(1, 2, 20, 20, 20)
    target[0, 0].view(-1)[:1000] = 1
    target[0, 1].view(-1)[:10] = 1
    logits = ((2 * target - 1) * 2.0).requires_grad_(True)
    (grad,) = torch.autograd.grad(get_loss("masked_ce_balanced", "sigmoid")(logits, target), logits)
    ratio = float(grad[0, 1].reshape(-1)[0] / grad[0, 0].reshape(-1)[0])
    assert ratio == pytest.approx(100.0, rel=1e-4)

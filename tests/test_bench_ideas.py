"""bench/ideas.py's pieces: its weighted losses are bench/reference.py's SEA losses when every voxel counts and
carry no gradient from voxels outside their weight (the interior ideas' weight: the clean brain deeper than their
depth), and its region-wise worst case takes each block from the
adversarial that lowers the score there, voxel for voxel one of its inputs (so inside their common ball); its smoothed
backward passes change the gradient and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ideas  # noqa: E402  (bench/ideas.py)
import reference  # noqa: E402


def test_weighted_losses_are_the_reference_losses_with_every_voxel_and_ignore_voxels_outside_their_weight():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 6, 6, 6) * 3
    truth = logits[0].argmax(0)
    truth[0] = 1 - truth[0]  # some voxels already flipped: the spherical loss's mask matters
    ones = torch.ones(6, 6, 6)
    assert torch.allclose(ideas.weighted_spherical(ones)(logits, truth), reference.masked_spherical_loss(logits, truth))
    assert torch.allclose(ideas.weighted_js(ones)(logits, truth), reference.js_loss(logits, truth))
    assert not torch.allclose(ideas.weighted_js(ones, 0.5)(logits, truth), reference.js_loss(logits, truth))
    band = torch.zeros(6, 6, 6)
    band[2:4] = 1
    for loss in (ideas.weighted_spherical(band), ideas.weighted_js(band, 2.0)):
        x = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(x, truth), x)
        assert grad[:, :, 2:4].abs().sum() > 0
        assert grad[:, :, :2].abs().sum() == 0 and grad[:, :, 4:].abs().sum() == 0


class _Blocks:
    """A stand-in scan for the stitch: its score is the share of voxels that differ from a goal made of two
    adversarials' blocks (lower is stronger), so the best stitch is the goal itself."""

    def __init__(self, goal: np.ndarray):
        self.goal = goal
        self.calls = 0

    def dice(self, array: np.ndarray) -> float:
        self.calls += 1
        return float((array != self.goal).mean())


def test_stitch_takes_each_block_from_the_adversarial_that_lowers_the_score():
    rng = np.random.default_rng(0)
    up = rng.uniform(0, 1, (9, 9, 9)).astype(np.float32)
    down = -rng.uniform(0, 1, (9, 9, 9)).astype(np.float32)
    goal = up.copy()
    goal[:3, 3:6, 6:] = down[:3, 3:6, 6:]
    goal[6:, :3, :3] = down[6:, :3, :3]
    scan = _Blocks(goal)
    stitched = ideas.stitch(scan, {"up": up, "down": down})  # type: ignore[arg-type]
    assert np.array_equal(stitched, goal)
    assert np.all((stitched == up) | (stitched == down))  # each voxel one of the inputs': inside their ball
    assert scan.calls <= 2 + 2 * 27  # every input scored once, each block tried once a sweep


def test_interior_losses_see_only_the_clean_brain_deeper_than_their_depth():
    reference_map = torch.zeros(9, 9, 9, dtype=torch.long)
    reference_map[1:8, 1:8, 1:8] = 1
    scan = type("FakeScan", (), {})()
    scan.problem = type("FakeProblem", (), {"reference": reference_map})()
    scan.distance = torch.from_numpy(ideas.boundary_distance(reference_map.numpy() == 1)).float()
    deep = (reference_map == 1) & (scan.distance > 2)
    assert 0 < int(deep.sum()) < int((reference_map == 1).sum())
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 9, 9, 9)
    logits[0, 1] += 4 * reference_map  # the clean brain predicted as brain: every reference voxel counts in spherical
    for name in ("interior", "js_interior"):
        stages = ideas.idea_stages(scan, name, "2", 10)  # type: ignore[arg-type]
        assert stages is not None and [steps for _, steps in stages] == [10]
        x = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(stages[0][0](x, reference_map), x)
        voxels = grad.abs().sum((0, 1)) > 0
        assert torch.equal(voxels, deep), name


def test_shrink_searches_a_larger_ball_first_and_its_ball_keeps_the_scan_range():
    scan = type("FakeScan", (), {"eps": 2.0, "eps_255": 8.0})()
    stages = ideas.idea_stages(scan, "shrink", "12", 5)  # type: ignore[arg-type]
    assert stages is not None and [stage[1:] for stage in stages] == [(5, 1.5), (5,), (5,)]
    x0 = torch.tensor([[0.0, 5.0, 10.0]])
    scan.problem = type("FakeProblem", (), {"x0": x0, "low": 0.0, "high": 10.0})()
    project = ideas.Scan.ball(scan, 1.5)  # type: ignore[arg-type]
    assert torch.equal(project(x0 + torch.tensor([[-9.0, 9.0, 1.0]])), torch.tensor([[0.0, 8.0, 10.0]]))
    assert torch.equal(project(x0 + torch.tensor([[2.0, -2.0, -2.5]])), torch.tensor([[2.0, 3.0, 7.5]]))


def test_tanh_adam_stays_inside_the_ball_and_returns_its_strongest_iterate():
    """The change of variables ``x = x0 + eps tanh(w)`` never leaves the ball (nor the scan's range), flips the
    voxels within eps of the decision threshold, and what it returns is the iterate with the lowest score."""
    torch.manual_seed(0)
    x0 = torch.rand(1, 8, 8, 8) * 10

    def logits(x: torch.Tensor) -> torch.Tensor:  # "brain" where the voxel is brighter than 5
        z = x[0] - 5
        return torch.stack([-z, z])[None]

    problem = reference.Problem(logits, x0, eps=1.0, integer=False)
    scan = type("FakeScan", (), {"problem": problem, "eps": 1.0})()
    seen: list[float] = []
    score_of = problem.loss_and_grad

    def recording(x: torch.Tensor):
        value, grad, score = score_of(x)
        seen.append(score)
        return value, grad, score

    problem.loss_and_grad = recording  # type: ignore[method-assign]
    adversarial = torch.from_numpy(ideas.tanh_adam(scan, [(reference.js_loss, 20)], 0.3))[None]  # type: ignore[arg-type]
    assert float((adversarial - x0).abs().max()) <= 1.0 + 1e-5
    assert float(adversarial.min()) >= float(x0.min()) and float(adversarial.max()) <= float(x0.max())
    final = reference.dice(logits(adversarial)[0].argmax(0), problem.reference)
    assert final == min(seen) < 0.9  # the strongest iterate, and it flipped voxels near the threshold


def test_a_smoothed_backward_keeps_the_forward_and_is_undone_on_leaving():
    """``relu:T`` and ``gn_stop`` change the gradient only: the logits are the network's, and leaving the context
    restores the network's own gradient (the chain after the smoothed stage ascends the real one)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(),
                                  torch.nn.Conv3d(4, 2, 3, padding=1))
    x = torch.randn(1, 1, 6, 6, 6)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        out = network(leaf)
        (grad,) = torch.autograd.grad(out[:, 1].sum(), leaf)
        return out.detach(), grad

    logits, exact = run()
    for settings in ({"relu": 0.3}, {"relu": float("inf")}, {"stop_norm": True}):
        with ideas.smoothed_backward(network, **settings):
            smoothed_logits, smoothed = run()
        assert torch.allclose(smoothed_logits, logits, atol=1e-5)
        assert not torch.allclose(smoothed, exact)
        assert torch.equal(run()[1], exact)


def test_the_lovasz_loss_is_one_minus_iou_on_hard_predictions_and_rises_with_the_errors():
    """The Lovasz extension is exact at the cube's corners: on confident predictions the loss is the Jaccard loss
    (1 - IoU) of each class, averaged; a softer prediction of the same labels lies between."""
    lovasz_loss = ideas.lovasz_loss
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 2, (6, 5, 4), generator=generator)
    prediction = torch.randint(0, 2, (6, 5, 4), generator=generator)
    logits = torch.stack([(prediction == 0).float(), (prediction == 1).float()])[None] * 60

    def jaccard_loss(c: int) -> float:
        inter = ((prediction == c) & (reference == c)).sum()
        return float(1 - inter / ((prediction == c) | (reference == c)).sum())

    assert float(lovasz_loss((1,))(logits, reference)) == pytest.approx(jaccard_loss(1), abs=1e-5)
    assert float(lovasz_loss()(logits, reference)) == pytest.approx((jaccard_loss(0) + jaccard_loss(1)) / 2, abs=1e-5)
    right = torch.stack([(reference == 0).float(), (reference == 1).float()])[None] * 60
    assert float(lovasz_loss()(right, reference)) == pytest.approx(0, abs=1e-5)
    soft = lovasz_loss()(logits / 60, reference)
    assert 0 < float(soft) < 1

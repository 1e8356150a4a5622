"""Members batched through the network (``MedIS(together=N)``, ``--together``): the same members, traces and
selection as run one after another; members that finish leave the batch; the memory plan counts them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medis3d.attacks.base import Together, drive_together
from medis3d.fusion import MedIS
from medis3d.io import read_volume

# members of different optimisers, losses and starts, some stopping early (least-perturbation fusion)
MEMBERS = ("igsm:dice,igsm:ce,pgd:ce,apgd:masked_spherical[random_start=1],apgd:js[random_start=1,seed=1],"
           "adam:cosine,apgd:ce[radii=sea],lowfreq:ce")


def _run(target, volume, together: int, select: str = "least", eps: float = 12 / 255, steps: int = 6):
    medis = MedIS(target, members_spec=MEMBERS, eps=eps, step=2 / 255, steps=steps, select=select, together=together)
    return medis, medis(volume)


def _same_members(a, b):
    assert [m.name for m in a.members] == [m.name for m in b.members]
    for x, y in zip(a.members, b.members):
        assert x.success == y.success, x.name
        assert x.steps == y.steps, x.name
        assert len(x.trace) == len(y.trace), x.name
        assert [s.success for s in x.trace] == [s.success for s in y.trace], x.name
        np.testing.assert_allclose([s.score for s in x.trace], [s.score for s in y.trace], atol=2e-3, err_msg=x.name)
        losses = [(s.loss, t.loss) for s, t in zip(x.trace, y.trace) if s.loss is not None]
        np.testing.assert_allclose([p for p, _ in losses], [q for _, q in losses], rtol=1e-3, atol=1e-5, err_msg=x.name)
        assert x.score == pytest.approx(y.score, abs=2e-3), x.name
        # the kept iterate as stored: integers, so float rounding in the batched network moves few voxels. Adam's
        # step divides by the gradient's running size, so where a voxel's gradient is about zero the rounding's sign
        # sets a whole step: on one CI host 0.33% of adam:cosine's voxels differed, its scores and losses the same.
        # Members mixed up in the batch would move most voxels.
        assert np.mean(x.adversarial != y.adversarial) < 1e-2, x.name
    assert a.selected == b.selected


@pytest.mark.parametrize("select", ["least", "strongest"])
def test_members_together_match_members_one_by_one(tiny_target, scan_file, select):
    volume = read_volume(scan_file)
    _, alone = _run(tiny_target, volume, 1, select)
    medis, together = _run(tiny_target, volume, 8, select)
    _same_members(alone, together)
    assert alone.together is None
    assert together.together["largest"] == 8
    # the budget holds in what is kept, batched or not
    for m in together.members:
        assert np.abs(m.adversarial - volume.array).max() <= together.eps_native + 1e-4


def test_groups_of_members_match_too(tiny_target, scan_file):
    volume = read_volume(scan_file)
    _, alone = _run(tiny_target, volume, 1)
    _, grouped = _run(tiny_target, volume, 3)
    _same_members(alone, grouped)
    assert grouped.together["largest"] == 3


def test_a_member_that_finishes_leaves_the_batch(tiny_target, scan_file):
    """IGSM under the least-perturbation selection stops at its first success (a large budget: at once), the APGD
    member under the worst case runs its iterations: after the IGSM member's last pass, the APGD member's passes
    carry it alone."""
    volume = read_volume(scan_file)
    options = {"eps": 48 / 255, "step": 24 / 255, "steps": 8, "together": 2}
    least = MedIS(tiny_target, members_spec="igsm:ce", select="least", **options)
    worst = MedIS(tiny_target, members_spec="apgd:ce", select="strongest", **options)
    setting = worst.prepare(volume)
    budget = setting.budget
    attacks = [least.attack(least.members()[0], budget, setting.goal), worst.attack(worst.members()[0], budget, setting.goal)]
    log = Together()
    results = drive_together([a.iterate(volume) for a in attacks], tiny_target, volume, 2, log)
    igsm, apgd = results
    assert igsm.success and len(igsm.trace) < len(apgd.trace)
    assert log.passes == len(apgd.trace)  # one pass per APGD iterate: the IGSM member rode along while it ran
    assert log.sizes.count(2) == len(igsm.trace) and log.sizes.count(1) == len(apgd.trace) - len(igsm.trace)


def test_evaluate_many_equals_evaluate(tiny_target, scan_file):
    volume = read_volume(scan_file)
    clean = torch.from_numpy(volume.array)
    xs = [clean, clean + 20.0, clean - 15.0]
    reference = tiny_target.loss_target(tiny_target.predict(volume))
    losses = [lambda logits, w=w: w * torch.nn.functional.nll_loss(logits, reference[:, 0]) for w in (1.0, 2.0, 0.5)]
    many = tiny_target.evaluate_many(xs, volume, losses)
    for x, fn, ev in zip(xs, losses, many):
        one = tiny_target.evaluate(x, volume, fn)
        assert ev.loss == pytest.approx(one.loss, rel=1e-5)
        assert torch.allclose(ev.grad, one.grad, rtol=1e-4, atol=1e-6 * float(one.grad.abs().max()))
        assert np.array_equal(ev.segmentation, one.segmentation)
    plain = tiny_target.evaluate_many(xs, volume, [None] * 3)
    for x, ev in zip(xs, plain):
        assert ev.grad is None and np.array_equal(ev.segmentation, tiny_target.evaluate(x, volume).segmentation)
    with pytest.raises(ValueError):
        tiny_target.evaluate_many(xs[:2], volume, [losses[0], None])


def test_together_must_be_positive(tiny_target):
    from medis3d.errors import InputError

    with pytest.raises(InputError, match="--together"):
        MedIS(tiny_target, together=0)


@pytest.mark.parametrize("windows", ["one batch", "batch by batch"])
def test_float16_members_batched_each_keep_their_own_upstream_scale(tiny_target, scan_file, windows):
    """In float16 (CUDA's --amp) each member's upstream gradient is scaled to a peak of 1 on its own: one scale for
    the batch, set by the member with the largest upstream (DAG's loss is a sum over the voxels, a mean loss's entries
    are 1/N of that), flushed a mean loss's whole gradient to zero, so IGSM with CE beside DAG did not move (mean IoU
    1.000 at 16/255, 0.587 alone)."""
    from medis3d.attacks import Goal
    from medis3d.losses import get_loss

    volume = read_volume(scan_file)
    settings = {"sw_batch_size": 64} if windows == "one batch" else {"sw_batch_size": 4}
    half = tiny_target.configure(amp=True, amp_dtype=torch.float16, **settings)
    goal = Goal(half, half.predict(volume))
    ce = get_loss("ce", half.activation)
    x = torch.from_numpy(volume.array)

    def mean(z: torch.Tensor) -> torch.Tensor:
        return ce(z, goal.loss_target)

    def summed(z: torch.Tensor) -> torch.Tensor:  # as DAG's loss: a sum over the voxels
        return ce(z, goal.loss_target) * z[0, 0].numel()

    alone = half.evaluate(x, volume, mean).grad
    batched = half.evaluate_many([x, x], volume, [summed, mean])[1].grad
    assert float((alone != 0).float().mean()) > 0.99
    assert float((torch.sign(batched) == torch.sign(alone)).float().mean()) > 0.999
    assert torch.allclose(batched, alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max()))


def test_a_member_is_reported_done_when_it_leaves_the_batch(tiny_target, scan_file):
    """The progress hears of a member's end when it leaves the batch, as when alone: told only at the batch's end,
    a member that had stopped (FGSM after two passes) counted as running until the last member stopped (four members
    batched, each stopped at its first success, the last in the 3rd round: the count stood at 0.41 of the members,
    ETA 14 s left after 10 s, where one by one it stood at 0.78, as it now does batched at 0.81)."""
    volume = read_volume(scan_file)
    events: list[tuple] = []

    class Progress:
        def __call__(self, member, t, total, score):
            events.append(("step", member, t))

        def member_done(self, member, success, steps, score):
            events.append(("done", member, steps))

    for together in (1, 2):
        events.clear()
        medis = MedIS(tiny_target, members_spec="fgsm:ce,igsm:ce", eps=2 / 255, step=1 / 255, steps=6, together=together,
                      progress=Progress())
        result = medis(volume)
        fgsm, igsm = result.members
        assert not igsm.success and len(igsm.trace) == 7  # IGSM ran all its steps
        fgsm_done = events.index(("done", "fgsm:ce", fgsm.steps))
        assert fgsm_done < events.index(("step", "ce", 2)), together  # FGSM's end came before IGSM's third step
        assert events[-1] == ("done", "ce", igsm.steps)


def test_a_members_time_is_its_span_and_its_share_of_the_passes_it_shared():
    """A member's time_s under --together is its wall span, which holds the passes it shared and other members'
    chunks: the spans of members run together overlap and summed to more than the time they took (1.2 s for 0.8 s
    here). time_share_s splits each pass among the members in it: the shares add up to the time taken; alone,
    a member's share is its span."""
    import time

    from medis3d.attacks.base import Request, drive

    pass_s = 0.2

    class Slow:  # a batched pass costs the same whatever its size (a device kept busy)
        def evaluate_many(self, xs, volume, objectives, gradient):
            time.sleep(pass_s)
            return [None] * len(xs)

        def evaluate(self, x, volume, objective, gradient="standard"):
            return self.evaluate_many([x], volume, [objective], gradient)[0]

    class Result:
        time_s = 0.0
        time_share_s: float | None = None

    def member(passes: int):
        start = time.perf_counter()
        for _ in range(passes):
            yield Request(torch.zeros(1), None)
        result = Result()
        result.time_s = time.perf_counter() - start
        return result

    began = time.perf_counter()
    long, short = drive_together([member(4), member(2)], Slow(), None, 2)
    took = time.perf_counter() - began
    assert long.time_s + short.time_s > took + pass_s  # the spans overlap: 1.2 s for 0.8 s
    assert long.time_share_s == pytest.approx(3 * pass_s, abs=0.05)  # half of 2 shared passes, 2 alone
    assert short.time_share_s == pytest.approx(pass_s, abs=0.05)  # half of its 2
    assert long.time_share_s + short.time_share_s == pytest.approx(took, abs=0.02)
    alone = drive(member(2), Slow(), None)
    assert alone.time_share_s == alone.time_s == pytest.approx(2 * pass_s, abs=0.05)

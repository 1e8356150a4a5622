"""Mixed precision and checkpointing keep the attack's outcome; --memory-budget keeps the peak under budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medis3d.bundle import load_bundle
from medis3d.fusion import MedIS
from medis3d.io import read_volume
from medis3d.memory import parse_size


def _attack(bundle, scan, **configure):
    target = load_bundle(bundle).configure(**configure)
    return MedIS(target, losses="ce,dice", eps=24 / 255, step=4 / 255, steps=4)(read_volume(scan))


def test_checkpointing_and_amp_keep_the_outcome(tiny_bundle, scan_file):
    plain = _attack(tiny_bundle, scan_file)
    ckpt = _attack(tiny_bundle, scan_file, checkpoint=True)
    amp = _attack(tiny_bundle, scan_file, amp=True)
    # checkpointing recomputes the same values: the same attack, voxel for voxel
    assert np.array_equal(ckpt.adversarial.array, plain.adversarial.array)
    assert [m.success for m in ckpt.members] == [m.success for m in plain.members]
    # bfloat16 changes the gradient slightly: the same verdict and a similar outcome
    assert amp.success == plain.success
    assert amp.chosen.loss == plain.chosen.loss
    assert abs(amp.chosen.score - plain.chosen.score) < 0.1


def test_checkpointing_runs_a_view_and_leaves_the_shared_network_as_it_is(tiny_bundle, scan_file):
    """A checkpointed target is a new target over a view of the network: the same weight tensors, the same
    gradient, and the loaded target's own network never wrapped (a later volume of a batch gets it unchanged)."""
    import torch

    from medis3d.checkpointing import CheckpointedStage

    target = load_bundle(tiny_bundle)
    checkpointed = target.configure(checkpoint=True)
    assert checkpointed.checkpointing and not target.checkpointing
    assert any(isinstance(m, CheckpointedStage) for m in checkpointed.network.modules())
    assert not any(isinstance(m, CheckpointedStage) for m in target.network.modules())
    shared = {id(p) for p in target.network.parameters()}
    assert shared and {id(p) for p in checkpointed.network.parameters()} == shared
    volume = read_volume(scan_file)
    x = torch.from_numpy(volume.array)

    def loss(logits):
        return torch.log_softmax(logits, 1)[:, 1].mean()

    plain, viewed = target.evaluate(x, volume, loss), checkpointed.evaluate(x, volume, loss)
    assert torch.allclose(plain.gradient(), viewed.gradient(), rtol=1e-5, atol=1e-9) and plain.gradient().abs().sum() > 0
    from dataclasses import FrozenInstanceError

    handle = checkpointed.network.register_forward_hook(lambda module, inputs, output: output * 0)  # the view's own hooks
    try:
        assert torch.equal(target.evaluate(x, volume).scan_logits, plain.scan_logits)
    finally:
        handle.remove()
    with pytest.raises(FrozenInstanceError):  # frozen: settings change only by making a new target
        target.checkpointing = True  # type: ignore[misc]


def test_parse_size():
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5g") == int(1.5 * 2**30) and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(Exception, match="memory-budget"):
        parse_size("lots")


CHILD = r"""
import json, sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))  # the test process's share of the cores (pytest-xdist)
from monai.networks.nets import SegResNet
from medis3d.engine import WindowSettings
from medis3d.io.volume import Volume
from medis3d.target import Target
from medis3d.preprocessing import DifferentiablePreprocessing
from medis3d.memory import plan_memory
budget, members = int(sys.argv[1]), int(sys.argv[3])
torch.manual_seed(0)
net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8)
target = Target(network=net, preprocessing=DifferentiablePreprocessing([]), window=WindowSettings((64, 64, 64), sw_batch_size=4, overlap=0.25))
vol = Volume(array=np.random.default_rng(0).random((1, 96, 96, 64), dtype=np.float32), affine=np.eye(4))
x = torch.from_numpy(vol.array)
target.evaluate(x[:, :32, :32, :32].contiguous(), Volume(array=vol.array[:, :32, :32, :32].copy(), affine=np.eye(4)))  # warm up the allocator
plan = None
if budget:
    plan = plan_memory(target, target.model_shape(vol), budget, members=members)
    target = target.configure(sw_batch_size=plan.sw_batch_size, checkpoint=plan.checkpoint, amp=plan.amp)
together = plan.together if plan else members
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident size
    f.write("5")
loss = lambda l: torch.softmax(l, 1)[:, 1].mean()
for start in range(0, members, together):  # members batched as MedIS(together=...) batches them
    n = min(together, members - start)
    target.evaluate_many([x + k for k in range(n)], vol, [loss] * n)
peak = status("VmHWM:")
print(json.dumps({"used": peak - base, "plan": plan.as_dict() if plan else None}))
"""


def _child(budget: int, members: int = 1) -> dict:
    root = Path(__file__).resolve().parent.parent
    import torch

    # The budget bounds the tensors of a step (as CUDA's allocator peak counts them). glibc's heap keeps freed
    # blocks resident and reuses them unevenly (this child's resident peak ranged 227-320 MB over runs for the
    # same 167 MB of tensors), so the child maps every block of 128 KiB or more on its own: its resident size
    # then follows the tensors and the measurement repeats.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(budget), str(torch.get_num_threads()), str(members)],
                         capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_budget_keeps_measured_peak_under_budget():
    budget = 320 * 2**20
    free = _child(0)["used"]  # the inferer's own settings: 4 windows of 64^3 per batch (measured ~630 MB)
    assert free > budget, "the budget must be tighter than the default settings for the test to mean anything"
    run = _child(budget)
    assert run["plan"]["fits"], run
    assert run["plan"]["sw_batch_size"] < 4 or run["plan"]["checkpoint"] or run["plan"]["amp"]
    assert run["used"] <= budget, (run, budget, free)


def test_memory_budget_counts_members_that_share_a_pass():
    """Three members batched: the plan shrinks how many share a pass (or the window batch) to keep the measured
    peak of the batched gradient pass under the budget."""
    budget = 700 * 2**20
    free = _child(0, members=3)["used"]  # all three together at the inferer's settings
    assert free > budget, "the budget must be tighter than three members together for the test to mean anything"
    run = _child(budget, members=3)
    plan = run["plan"]
    assert plan["fits"], run
    assert plan["together"] < 3 or plan["sw_batch_size"] < 4 or plan["checkpoint"] or plan["amp"]
    assert run["used"] <= budget, (run, budget, free)


def test_members_together_fits_the_members_in_the_budget(tiny_target):
    import numpy as np

    from medis3d.io.volume import Volume
    from medis3d.memory import auto_together, members_together, volume_buffers, weight_bytes

    shape = tiny_target.model_shape(Volume(array=np.zeros((1, 40, 36, 32), np.float32), affine=np.eye(4)))
    assert members_together(tiny_target, shape, 1, 0) == 1
    assert members_together(tiny_target, shape, 8, 2**40) == 8
    assert members_together(tiny_target, shape, 8, 0) == 1  # never none
    small = weight_bytes(tiny_target.network) + 2.5 * volume_buffers(tiny_target, shape)
    assert members_together(tiny_target, shape, 8, small) <= 2
    assert auto_together(tiny_target, shape, 8) == 1  # on a CPU: one at a time (batched measured slower there)


def test_plan_never_picks_amp_where_it_is_slow(tiny_target, monkeypatch):
    """On a CPU without bfloat16 instructions AMP costs 46x the time: a tight budget gets checkpointing and a smaller
    window batch, or the refusal, never AMP; ``--amp`` there says so in a notice."""
    import numpy as np

    from medis3d import memory
    from medis3d.io.volume import Volume

    shape = tiny_target.model_shape(Volume(array=np.zeros((1, 40, 36, 32), np.float32), affine=np.eye(4)))
    monkeypatch.setattr(memory, "amp_is_fast", lambda device: False)
    for budget in (1, 2**20, 8 * 2**20, 2**30):
        assert not memory.plan_memory(tiny_target, shape, budget).amp
    monkeypatch.setattr(memory, "amp_is_fast", lambda device: True)
    assert memory.plan_memory(tiny_target, shape, 1).amp  # nothing fits: the smallest estimate, which uses AMP
    monkeypatch.setattr(memory, "amp_is_fast", lambda device: False)
    with_amp = tiny_target.configure(amp=True)
    assert any("without bfloat16 instructions" in n for n in with_amp.notices)
    assert not any("bfloat16" in n for n in tiny_target.notices) and not tiny_target.precision.enabled  # a new target


@pytest.mark.parametrize("name", ["SegResNet", "SegResNetDS", "UNet", "DynUNet"])
def test_a_checkpointed_view_gives_the_networks_output_and_gradient(name):
    """Every stage the view wraps is called as the network calls it (SegResNetDS indexes the ModuleDicts of its
    ModuleLists: a wrapped container broke it), and the view computes what the network does."""
    import torch
    from monai.networks import nets

    from medis3d.checkpointing import CheckpointedStage, checkpointed_view

    torch.manual_seed(0)
    network = {
        "SegResNet": lambda: nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8),
        "SegResNetDS": lambda: nets.SegResNetDS(spatial_dims=3, in_channels=1, out_channels=2, init_filters=4),
        "UNet": lambda: nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1),
        "DynUNet": lambda: nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2]),
    }[name]().eval()
    view, count, notice = checkpointed_view(network)
    assert count > 0 and notice is None
    assert any(isinstance(m, CheckpointedStage) for m in view.modules())
    assert not any(isinstance(m, CheckpointedStage) for m in network.modules())
    x = torch.randn(1, 1, 32, 32, 32, requires_grad=True)
    expected = network(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    got = view(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_a_memory_plan_keeps_the_users_amp_and_checkpointing(tiny_target, monkeypatch):
    """--amp and --checkpoint with --memory-budget: the plan only adds them, as it only lowers the window batch. A
    budget that float32 met ran float32 (the plan said amp false) and dropped --amp and its notice, unsaid."""
    from medis3d import memory
    from medis3d.io.volume import Volume

    shape = tiny_target.model_shape(Volume(array=np.zeros((1, 40, 36, 32), np.float32), affine=np.eye(4)))
    for fast in (True, False):  # the user's --amp is kept even where the plan would not choose it
        monkeypatch.setattr(memory, "amp_is_fast", lambda device, fast=fast: fast)
        user = tiny_target.configure(amp=True, checkpoint=True)
        plan = memory.plan_memory(user, shape, 2**34)
        assert plan.fits and plan.amp and plan.checkpoint
        planned = user.configure(sw_batch_size=plan.sw_batch_size, checkpoint=plan.checkpoint, amp=plan.amp)
        assert planned.precision.enabled and planned.checkpointing
        assert any(n.startswith("mixed precision:") for n in planned.notices)
    plain = memory.plan_memory(tiny_target, shape, 2**34)
    assert not plain.amp and not plain.checkpoint  # nothing asked: the fastest setting that fits

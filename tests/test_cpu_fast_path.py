"""The CPU fast path, chosen and reported: threads from the cores a process may use (affinity, cgroup quota,
physical cores), and a window batch of 2 for small windows (batch-1 3-D convolutions take PyTorch's slow kernels)."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from medis3d import threads
from medis3d.cli import app
from medis3d.errors import InputError

runner = CliRunner()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._CHOICE.clear()


def _cgroup(tmp_path, proc_line, files):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_the_cgroup_v2_quota_is_the_smallest_over_the_process_cgroup_and_those_above(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/jobs/one", {
        "cpu.max": "max 100000", "jobs/cpu.max": "300000 100000", "jobs/one/cpu.max": "150000 100000"})
    assert threads._cgroup_quota(root, proc) == pytest.approx(1.5)
    root, proc = _cgroup(tmp_path / "none", "0::/", {"cpu.max": "max 100000"})
    assert threads._cgroup_quota(root, proc) is None


def test_the_cgroup_v1_quota_is_read_and_no_quota_is_none(tmp_path):
    root, proc = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc", {
        "cpu/docker/abc/cpu.cfs_quota_us": "200000", "cpu/docker/abc/cpu.cfs_period_us": "100000",
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert threads._cgroup_quota(root, proc) == pytest.approx(2.0)
    root, proc = _cgroup(tmp_path / "unlimited", "4:cpu,cpuacct:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert threads._cgroup_quota(root, proc) is None
    # mounted under the controllers' joint name, with no cpu link
    root, proc = _cgroup(tmp_path / "joint", "4:cpu,cpuacct:/job", {
        "cpu,cpuacct/job/cpu.cfs_quota_us": "400000", "cpu,cpuacct/job/cpu.cfs_period_us": "100000"})
    assert threads._cgroup_quota(root, proc) == pytest.approx(4.0)


def test_the_cores_available_are_capped_by_the_quota_and_the_physical_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "_torch_default", lambda: 16)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.5)
    cores, how = threads.available_cores()
    assert cores == 3 and "quota 2.5" in how
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    cores, how = threads.available_cores()
    assert cores == 16 and how.startswith("CPU affinity 16 of ")
    # hyperthreads: 16 logical CPUs, 8 physical cores (torch's own default), one thread a core
    monkeypatch.setattr(threads, "_torch_default", lambda: 8)
    cores, how = threads.available_cores()
    assert cores == 8 and "physical cores" in how


def test_threads_follow_the_cores_unless_the_environment_or_the_option_says(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: (1, "test"))
    for name in threads._ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    chosen = threads.apply_threads(None)
    assert torch.get_num_threads() == 1 and chosen["threads"] == 1 and "cores available" in chosen["why"]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    chosen = threads.apply_threads(None)
    assert torch.get_num_threads() == 2 and chosen["why"] == "OMP_NUM_THREADS=2 in the environment"
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    assert threads.apply_threads(None)["why"] == "OMP_NUM_THREADS=2, MKL_NUM_THREADS=2 in the environment"
    chosen = threads.apply_threads(3)
    assert torch.get_num_threads() == 3 and chosen["why"] == "--threads" and "more threads than cores" in chosen["notice"]
    assert threads.choice() == chosen
    with pytest.raises(InputError, match="--threads must be 1 or more"):
        threads.apply_threads(0)


def test_attack_reports_the_threads_it_ran_with(tiny_bundle, scan_file, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--steps", "1", "--eps", "4/255",
                                 "--losses", "ce", "--threads", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["threads"]["threads"] == 1 and report["target"]["threads"]["why"] == "--threads"
    assert torch.get_num_threads() == 1
    bad = runner.invoke(app, ["predict", str(scan_file), "--bundle", str(tiny_bundle), "--threads", "0", "--out", str(tmp_path / "p.nii.gz")])
    assert bad.exit_code != 0 and "--threads must be 1 or more" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "p.nii.gz").exists()
    torch.set_num_threads(2)
    checked = runner.invoke(app, ["bundle", "check", str(tiny_bundle), str(scan_file), "--threads", "1", "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["gradient"] and torch.get_num_threads() == 1  # bundle check takes it too


def test_an_inferers_window_batch_of_1_becomes_2_on_cpu_unless_asked_for(tiny_bundle, scan_file, tmp_path):
    from medis3d.bundle import load_bundle
    from medis3d.engine import CPU_WINDOW_BATCH_NOTICE
    from medis3d.io import read_volume

    bundle = tmp_path / "batch_one"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["inferer"]["sw_batch_size"] = 1
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    target = load_bundle(bundle)
    assert target.window.sw_batch_size == 2 and CPU_WINDOW_BATCH_NOTICE in target.notices
    asked = target.configure(sw_batch_size=1)
    assert asked.window.sw_batch_size == 1 and CPU_WINDOW_BATCH_NOTICE not in asked.notices
    volume = read_volume(scan_file)
    assert (target.predict(volume) == asked.predict(volume)).all()  # the same windows, grouped otherwise
    assert load_bundle(tiny_bundle).window.sw_batch_size == 4  # a bundle's larger batch is its own
    config["inferer"]["roi_size"] = [96, 96, 96]  # large windows gain little from a second one: they keep 1
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_bundle(bundle).window.sw_batch_size == 1
    config["inferer"]["roi_size"] = [24, 24, 24]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(bundle), "--steps", "1", "--eps", "4/255",
                                 "--losses", "ce", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["target"]["inferer"]["sw_batch_size"] == 2 and CPU_WINDOW_BATCH_NOTICE in report["target"]["notices"]


def test_conv3d_networks_run_channels_last_on_cpu_with_the_same_gradients(tiny_bundle, scan_file):
    from medis3d.bundle import load_bundle
    from medis3d.engine import CPU_CHANNELS_LAST_NOTICE, channels_last_on_cpu
    from medis3d.io import read_volume

    target = load_bundle(tiny_bundle)
    convs = [m for m in target.network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    assert any(not c.weight.is_contiguous() for c in convs)  # (one input channel or a 1x1x1 kernel is both layouts)
    assert CPU_CHANNELS_LAST_NOTICE in target.notices
    volume = read_volume(scan_file)
    plain = load_bundle(tiny_bundle)
    plain.network.to(memory_format=torch.contiguous_format)  # the default layout, for comparison
    assert all(c.weight.is_contiguous() for c in plain.network.modules() if isinstance(c, torch.nn.Conv3d))
    window = torch.randn(2, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    grads = []
    for net in (target.network, plain.network):
        w = window.clone().requires_grad_(True)
        out = net(w)
        (g,) = torch.autograd.grad(out.softmax(1)[:, 1].sum(), w)
        grads.append((out.detach(), g))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-5 * float(grads[1][1].abs().max()))
    assert (target.predict(volume) == plain.predict(volume)).mean() > 0.9995
    assert not channels_last_on_cpu(torch.nn.Linear(3, 2), "cpu")  # nothing to gain without 3-D convolutions
    assert not channels_last_on_cpu(torch.nn.Conv3d(1, 1, 3), "cuda")  # measured on CPU only


def test_channels_last_keeps_group_norm_as_exact_as_the_default_layout():
    """PyTorch's CPU GroupNorm in channels-last layout errs 60x more (a one-pass variance); fed the default layout,
    a SegResNet's logits are as exact against float64 as without channels-last."""
    import copy

    from monai.networks.nets import SegResNet

    from medis3d.engine import channels_last_on_cpu

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8).eval()
    exact = copy.deepcopy(net).double()
    x = torch.randn(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1)) * 3 + 5  # an offset, as intensities have
    with torch.no_grad():
        reference = exact(x.double())

        def error() -> float:
            return float((net(x).double() - reference).abs().max() / reference.abs().max())

        default = error()
        assert channels_last_on_cpu(net, "cpu")
        assert error() <= 4 * default + 1e-7, (error(), default)
        seen: list[bool] = []  # each GroupNorm is fed the default layout (its hook runs before this one)
        for norm in (m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)):
            norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        net(x)
        assert seen and all(seen), seen


def test_amp_searches_in_bfloat16_and_reports_float32_predictions(tiny_target, scan_file):
    """With --amp the members search in bfloat16, where voxels near the boundary fall otherwise than in float32; the
    clean prediction and every member's prediction, score and success are the float32 model's on the kept iterate."""
    import numpy as np

    from medis3d.fusion import MedIS
    from medis3d.io import read_volume

    volume = read_volume(scan_file)
    amp = tiny_target.configure(amp=True)
    assert amp.exact is not amp and amp.exact.network is amp.network and not amp.exact.precision.enabled
    assert tiny_target.exact is tiny_target
    assert any("bfloat16" in n and "scored in float32" in n for n in amp.notices)
    assert not any("scored in float32" in n for n in amp.configure(amp=False).notices)  # the precision chosen anew
    x = torch.from_numpy(volume.array)
    assert np.array_equal(amp.predict(volume), tiny_target.predict(volume))
    searched, exact_logits = amp.evaluate(x, volume).scan_logits, tiny_target.evaluate(x, volume).scan_logits
    assert not torch.equal(searched, exact_logits)  # bfloat16's logits (on the clean scan its labels may equal float32's)
    medis = MedIS(amp, members_spec=["pgd:ce", "apgd:js", "apgd:margin"], eps=12 / 255, step=2 / 255, steps=4,
                  success_threshold=0.6)
    result = medis(volume)
    differs = 0
    for member in result.members:
        adversarial = volume.with_array(member.adversarial)
        exact = tiny_target.predict(adversarial)
        assert np.array_equal(member.prediction, exact), member.name
        score = medis.prepare(volume).goal.score(exact)
        assert member.score == pytest.approx(score) and member.success == (score <= 0.6)
        differs += int(not np.array_equal(amp.evaluate(torch.from_numpy(adversarial.array), volume).segmentation, exact))
    assert differs  # the float32 rescoring changed what some member would have reported from its bfloat16 search
    assert np.array_equal(result.clean_prediction, tiny_target.predict(volume))


@pytest.mark.parametrize("windows", ["one batch", "batch by batch"])
def test_a_float16_gradient_keeps_its_small_entries_on_a_volume_of_any_size(tiny_target, scan_file, windows):
    """In float16 (CUDA's --amp) the upstream gradient is scaled to a peak of 1 before the network's backward pass:
    a fixed scale on a loss averaged over the scan's voxels flushed the small entries to zero on large volumes
    (emulated here by a loss scaled down as a mean over 78 M voxels would be: the gradient's sign agreed with
    float32's on 0.907 of the voxels, 0.998 on the scan's own size). Where a scale overflows float16, the
    gradient is taken again in float32."""
    from medis3d.attacks import Goal
    from medis3d.io import read_volume
    from medis3d.losses import get_loss

    volume = read_volume(scan_file)
    settings = {"sw_batch_size": 64} if windows == "one batch" else {"roi_size": [16, 16, 16], "sw_batch_size": 1}
    exact = tiny_target.configure(**settings)
    half = exact.configure(amp=True, amp_dtype=torch.float16)
    goal = Goal(exact, exact.predict(volume))
    ce, shrink = get_loss("ce", exact.activation), volume.array.size / 78_000_000
    x = torch.from_numpy(volume.array)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return ce(z, goal.loss_target) * shrink

    reference = exact.evaluate(x, volume, objective).grad
    assert float((torch.sign(half.evaluate(x, volume, objective).grad) == torch.sign(reference)).float().mean()) > 0.99
    half.engine.precision.upstream_peak = 1e30  # float16 overflows: the backward pass again in float32
    overflowed = half.evaluate(x, volume, objective).grad
    assert bool(torch.isfinite(overflowed).all())
    assert float((torch.sign(overflowed) == torch.sign(reference)).float().mean()) > 0.99


def test_with_amp_a_member_stops_only_at_a_success_the_float32_model_confirms(tiny_target, scan_file, monkeypatch):
    """Least-perturbation members stop at their first success; in reduced precision a voxel near the boundary may
    fall the other way, so a member stopped at a bfloat16 success that float32 rejected and reported a failure where
    it could have gone on. Here float32 rejects every perturbed scan (its predictions of them are the clean one's):
    the members run every step and report failures; they stopped at their bfloat16 success before."""
    import numpy as np

    from medis3d.fusion import MedIS
    from medis3d.io import read_volume
    from medis3d.target import Target

    volume = read_volume(scan_file)
    amp = tiny_target.configure(amp=True)
    clean = tiny_target.predict(volume)
    real = Target.predict

    def rejecting(self, scan):
        return clean if self is amp.exact and not np.array_equal(scan.array, volume.array) else real(self, scan)

    searched = MedIS(amp, members_spec=["igsm:ce", "pgd:ce"], eps=24 / 255, step=4 / 255, steps=6, success_threshold=0.9)(volume)
    assert all(m.success and len(m.trace) < 7 for m in searched.members)  # bfloat16 and float32 agree: an early stop
    monkeypatch.setattr(Target, "predict", rejecting)
    result = MedIS(amp, members_spec=["igsm:ce", "pgd:ce"], eps=24 / 255, step=4 / 255, steps=6, success_threshold=0.9)(volume)
    for member in result.members:
        assert not member.success and len(member.trace) == 7, (member.name, [(s.score, s.success) for s in member.trace])


def test_attack_prints_the_models_notices_with_the_outputs(tiny_bundle, scan_file, tmp_path):
    """The model's notices (here --amp's: the search may be weaker in reduced precision; a memory plan that turns
    on AMP gives the same) were kept in report.json but not shown with the outputs' own notices."""
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--losses", "ce", "--steps", "1",
                                 "--amp", "--out", str(tmp_path / "out")])
    assert result.exit_code in (0, 1), result.output
    assert "mixed precision" in result.output and "can be weaker" in result.output

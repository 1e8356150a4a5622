"""The Target attacks what MONAI runs: same preprocessing, same prediction, exact gradients in the scan's space."""

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from medis3d.io import read_volume


def test_preprocessing_equals_bundle_preprocessing(tiny_bundle, tiny_target, scan_file):
    parser = ConfigParser()
    parser.read_config(str(tiny_bundle / "configs" / "inference.json"))
    monai_pre = parser.get_parsed_content("preprocessing")
    expected = monai_pre({"image": str(scan_file)})["image"]
    vol = read_volume(scan_file)
    got = tiny_target.model_input(torch.from_numpy(vol.array), vol)
    assert got.shape == expected.shape
    assert torch.allclose(got.as_tensor(), expected.as_tensor().float(), atol=1e-5)
    assert np.allclose(got.affine.numpy(), expected.affine.numpy(), atol=1e-5)


def test_prediction_matches_monai_inference_on_scan_grid(tiny_bundle, tiny_target, scan_file):
    """The tiny bundle's postprocessing (softmax, argmax) has no Invertd: MONAI's prediction is its labels on the
    model's grid. medis3d's is those labels on the scan's grid, each voxel the label of the nearest model voxel, as a
    viewer overlays MONAI's file on the scan. It interpolated the probabilities back as an Invertd the bundle does not
    have would (this test's reference was that Invertd, Dice >= 0.99): 249 of 46080 voxels of the tiny bundle's
    prediction differed from the bundle's own labels so overlaid, now none."""
    from monai.transforms.utils import convert_applied_interp_mode

    from medis3d.bundle import NO_INVERTD_NOTICE

    parser = ConfigParser()
    parser.read_config(str(tiny_bundle / "configs" / "inference.json"))
    monai_pre = parser.get_parsed_content("preprocessing")
    monai_post = parser.get_parsed_content("postprocessing")
    data = monai_pre({"image": str(scan_file)})
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None], (24, 24, 24), 4, tiny_target.network, overlap=0.25, mode="gaussian")
    pred = MetaTensor(logits[0], meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    labels = monai_post({"image": data["image"], "pred": pred})["pred"]  # the bundle's own output, on the model's grid
    assert labels.shape[1:] == data["image"].shape[1:]
    ops = convert_applied_interp_mode([dict(op) for op in data["image"].applied_operations], mode="nearest")
    on_scan = monai_pre.inverse({"image": MetaTensor(labels.float(), meta=data["image"].meta, applied_operations=ops)})["image"]
    monai_labels = on_scan[0].round().numpy().astype(np.uint8)
    vol = read_volume(scan_file)
    ours = tiny_target.predict(vol)
    assert ours.shape == vol.spatial_shape == monai_labels.shape
    assert 0.01 < (ours > 0).mean() < 0.5
    assert np.array_equal(ours, monai_labels), int((ours != monai_labels).sum())
    assert NO_INVERTD_NOTICE in tiny_target.notices


def test_native_gradient_equals_full_autograd(tiny_target, scan_file):
    """Gradient of a scan-grid loss w.r.t. the native scan: engine + inverse vs one big autograd graph."""
    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array)
    weights = torch.randn(1, 2, *vol.spatial_shape, generator=torch.Generator().manual_seed(0))

    def loss(scan_logits):
        return (scan_logits * weights).sum()

    ours = tiny_target.evaluate(x, vol, loss).grad
    leaf = x.clone().requires_grad_(True)
    model_in = tiny_target.model_input(leaf, vol)
    logits = sliding_window_inference(model_in[None], (24, 24, 24), 4, tiny_target.network, overlap=0.25, mode="gaussian")
    scan_logits = tiny_target.to_scan_grid(logits, model_in)
    (expected,) = torch.autograd.grad(loss(scan_logits), leaf)
    assert expected.abs().sum() > 0
    assert (ours - expected).norm() / expected.norm() <= 1e-4


def test_a_loss_that_asks_for_raw_logits_gets_the_networks_logits_and_its_exact_gradient(tiny_target, scan_file):
    """SEA's spherical loss is not invariant to a shift of a voxel's logits: it is given the network's own logits
    mapped back to the scan grid (not the log-probabilities), with their exact gradient, while the evaluation's
    prediction still comes from the probabilities."""
    from medis3d.losses import get_loss

    assert get_loss("masked_spherical", "softmax").raw_logits and not get_loss("masked_spherical_logp", "softmax").raw_logits
    assert not get_loss("masked_spherical", "sigmoid").raw_logits and not get_loss("ce", "softmax").raw_logits
    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array)
    weights = torch.randn(1, 2, *vol.spatial_shape, generator=torch.Generator().manual_seed(1))
    seen = []

    def loss(scan_logits):
        seen.append(scan_logits.detach())
        return (scan_logits * weights).sum()

    loss.raw_logits = True
    ours = tiny_target.evaluate(x, vol, loss)
    assert torch.logsumexp(ours.scan_logits, 1).abs().max() < 1e-3  # the evaluation keeps the log-probabilities
    assert torch.logsumexp(seen[0], 1).abs().max() > 1.0  # the loss saw raw logits
    leaf = x.clone().requires_grad_(True)
    model_in = tiny_target.model_input(leaf, vol)
    logits = sliding_window_inference(model_in[None], (24, 24, 24), 4, tiny_target.network, overlap=0.25, mode="gaussian")
    raw = tiny_target.to_scan_grid(logits, model_in, raw=True)
    assert torch.allclose(raw.detach(), seen[0], atol=1e-4)
    (expected,) = torch.autograd.grad(loss(raw), leaf)
    assert (ours.grad - expected).norm() / expected.norm() <= 1e-4


def test_confident_voxels_keep_their_margin_and_its_gradient_on_the_scan_grid(tiny_target, scan_file):
    """The losses see the scan-grid log-probabilities: a voxel right by a logit margin of 30 keeps that margin
    and its gradient there (a clamp at 1 - 1e-6 made every margin beyond 13.8 flat: no gradient at all from
    the most confident voxels, measured as a weaker margin attack on the shipped model)."""
    vol = read_volume(scan_file)
    model_in = tiny_target.model_input(torch.from_numpy(vol.array), vol)
    stitched = torch.zeros(1, 2, *model_in.shape[1:])
    stitched[:, 1] = 30.0  # class 1 everywhere, by a margin of 30
    stitched.requires_grad_(True)
    scan = tiny_target.to_scan_grid(stitched, model_in)
    margin = scan[0, 1] - scan[0, 0]
    assert torch.allclose(margin, torch.full_like(margin, 30.0), atol=1e-3)
    (grad,) = torch.autograd.grad(margin.mean(), stitched)
    assert float(grad[:, 1].sum()) == pytest.approx(1.0, rel=1e-3) and float(grad[:, 0].sum()) == pytest.approx(-1.0, rel=1e-3)


def test_clipped_voxels_still_get_gradient(tiny_target, scan_file):
    """The HU window clips at -100..300; BPDA passes the gradient through the clip."""
    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array).clone()
    x[0, :5] = 1000.0  # far above the window: clamp would give zero gradient
    grad = tiny_target.evaluate(x, vol, lambda logits: torch.softmax(logits, 1)[:, 1].mean()).grad
    assert grad[0, :5].abs().sum() > 0


def test_intensity_scale_from_window(tiny_target, scan_file):
    scale, note = tiny_target.intensity_scale(read_volume(scan_file))
    assert scale == 400.0 and "ScaleIntensityRange" in note


def _small_target(network=None, **clip):
    """A Target on an untrained tiny UNet (or ``network``), 24^3 windows, the tiny bundle's preprocessing."""
    from monai.networks.nets import UNet

    from medis3d.engine import WindowSettings
    from medis3d.preprocessing import DifferentiablePreprocessing, build_step
    from medis3d.target import Target

    torch.manual_seed(0)
    window = dict(a_min=-100, a_max=300, b_min=0, b_max=1, clip=True) | clip
    steps = [build_step("Orientationd", {"axcodes": "RAS"}), build_step("Spacingd", {"pixdim": [1.5, 1.5, 1.5]}),
             build_step("ScaleIntensityRanged", window)]
    return Target(network or UNet(3, 1, 2, (4, 8), (2,)), DifferentiablePreprocessing(steps), WindowSettings(roi_size=(24, 24, 24)))


class _BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward says no")


class _Failing(torch.nn.Module):
    """Two output channels; fails in its forward or (``backward=True``) in its backward pass."""

    def __init__(self, backward: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.backward_fails = backward

    def forward(self, x):
        if not self.backward_fails:
            raise RuntimeError("forward says no")
        return _BackwardFails.apply(self.conv(x))


def test_only_the_networks_own_failures_are_reported_as_the_network_failing(scan_file, monkeypatch):
    """A RuntimeError of the loss or of the inverse preprocessing is one line with its own message, naming those; only
    the network's forward or backward pass on its windows is 'the network failed on its windows' (one window batch
    or several)."""
    from medis3d.errors import InputError

    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array)
    target = _small_target()

    def bad_loss(logits):
        raise RuntimeError("the loss exploded")

    for batch in (4, 1000):  # several window batches (two passes), or all windows in one (one pass with its graph)
        batched = target.configure(sw_batch_size=batch)
        with pytest.raises(InputError, match="its inverse or the attack's loss failed \\(not the network\\): the loss exploded$"):
            batched.evaluate(x, vol, bad_loss)
    with monkeypatch.context() as m:
        m.setattr(target.preprocessing, "invert", lambda t: (_ for _ in ()).throw(RuntimeError("the inverse exploded")))
        with pytest.raises(InputError, match="\\(not the network\\): the inverse exploded$"):
            target.evaluate(x, vol)
        with pytest.raises(InputError, match="\\(not the network\\): the inverse exploded$"):
            target.evaluate(x, vol, lambda logits: logits.sum())
    assert target.evaluate(x, vol, lambda logits: logits.sum()).grad.abs().sum() > 0  # nothing left broken

    cases = [(_Failing(), "forward says no", None), (_Failing(), "forward says no", torch.sum),
             (_Failing(backward=True), "backward says no", torch.sum)]
    for network, says, loss in cases:
        failing = _small_target(network)
        for batch in (4, 1000):
            batched = failing.configure(sw_batch_size=batch)
            with pytest.raises(InputError, match=f"the network failed on its 24x24x24 windows .*: {says}$"):
                batched.evaluate(x, vol, loss)


def test_intensity_scale_reads_a_zero_bound_as_zero(scan_file):
    """ScaleIntensityRange -100..300 -> -1..0 spans 1 model unit: 400 HU per unit, not 200 (b_max=0 read as 1)."""
    vol = read_volume(scan_file)
    scale, note = _small_target(b_min=-1, b_max=0).intensity_scale(vol)
    assert scale == 400.0 and "-1..0" in note
    assert _small_target(b_min=0, b_max=2).intensity_scale(vol)[0] == 200.0


def test_a_path_given_as_classes_is_told_where_label_files_go(tiny_target, tmp_path):
    """``--labels`` is the older name of ``--classes`` in attack and batch, and a folder of labels in evaluate: a path
    given as a class gets the difference spelt out; a wrong class name does not."""
    from medis3d.errors import InputError

    with pytest.raises(InputError, match=r"'liver' is not an output channel of this model; choose from 1 \(blob\)$"):
        tiny_target.select_classes("liver")
    for given in (str(tmp_path), "labels/case1.nii.gz"):
        with pytest.raises(InputError, match="older name of --classes .*evaluate a dataset's with --labels FOLDER"):
            tiny_target.select_classes(given)


@pytest.mark.parametrize("name, args", [("ClipIntensityPercentilesd", {"lower": 5, "upper": 95}),
                                        ("ThresholdIntensityd", {"threshold": 50, "above": True, "cval": 0})])
@pytest.mark.parametrize("size", [40, 102])  # 102^3 is past MONAI's 1,000,000-element switch to numpy percentiles
def test_a_clip_or_threshold_step_passes_the_attacks_gradient_straight_through(name, args, size):
    """MONAI's own derivative of a hard clip or threshold is zero on the voxels it changes (10 % and 50 % of them
    here), and ClipIntensityPercentiles' percentiles carry none past 1,000,000 voxels; both were labelled "exact".
    The attack's path passes them straight through (as ScaleIntensityRange's clip), with MONAI's values; the exact
    path keeps their own derivative."""
    from monai.data import MetaTensor

    from medis3d.preprocessing import DifferentiablePreprocessing, array_transform_class, build_step

    step = build_step(name, {"keys": "image", **args})
    assert step is not None and step.gradient.startswith("straight-through")
    preprocessing = DifferentiablePreprocessing([step])
    x = torch.rand(1, size, size, size, generator=torch.Generator().manual_seed(0)) * 100
    monai = torch.as_tensor(array_transform_class(name)[1](**args)(x.clone()))
    reached = {}
    for path in ("standard", "exact"):
        leaf = MetaTensor(x.clone(), affine=torch.eye(4)).requires_grad_(True)
        out = preprocessing(leaf, path)
        assert torch.allclose(out.as_tensor().detach(), monai, atol=1e-4)
        (grad,) = torch.autograd.grad(out.as_tensor().sum(), leaf)
        reached[path] = float((grad != 0).float().mean())
    assert reached["standard"] == 1.0 and reached["exact"] < 0.95


def _cast_bundle(tiny_bundle, tmp_path, position: int, dtype: str):
    """The tiny bundle with a CastToTyped to ``dtype`` at ``position`` of its preprocessing, a scan, MONAI's own model
    input for it, and medis3d's (leaf ``x`` on the scan, the input from the loaded target): (target, scan, x, got,
    expected)."""
    import json
    import shutil

    from conftest import save_nifti, synthetic_scan

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(position, {"_target_": "CastToTyped", "keys": "@image_key", "dtype": dtype})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    hu, _ = synthetic_scan(7)
    scan = save_nifti(tmp_path / "scan.nii.gz", hu, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    expected = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    volume = read_volume(scan)
    x = torch.from_numpy(volume.array).requires_grad_(True)
    target = load_bundle(bundle)
    return target, scan, x, target.model_input(x, volume), expected


@pytest.mark.parametrize("dtype", ["int16", "$numpy.int32"])
def test_a_cast_to_an_integer_inside_the_preprocessing_is_done_as_monai_does_it(tiny_bundle, tmp_path, dtype):
    """A CastToType to an integer after the resampling truncates the model's input; it was taken for an I/O step and
    skipped, so the model input differed from MONAI's by up to 0.0025 of the model's range (a 2 mm scan resampled to
    1.5 mm). Now it is done as MONAI does it, its gradient passed straight through."""
    _, _, x, got, expected = _cast_bundle(tiny_bundle, tmp_path, 4, dtype)
    assert torch.equal(got.as_tensor().detach(), expected.as_tensor().float())
    got.as_tensor().sum().backward()
    assert x.grad is not None and (x.grad != 0).float().mean() > 0.5


def test_a_cast_to_float16_is_rounded_as_monai_rounds_it_and_bundle_check_says_so(tiny_bundle, tmp_path):
    """A CastToType to float16 at the end of the preprocessing rounds the model's input; it was taken for an I/O step
    and skipped, so the model input differed from MONAI's by up to 2.3e-4 of the model's range. Now the values are
    MONAI's (rounded to float16, given to the network in float32), the gradient passed straight through, and bundle
    check says how."""
    from medis3d.bundle_check import check_bundle

    target, scan, x, got, expected = _cast_bundle(tiny_bundle, tmp_path, 5, "$torch.float16")
    assert expected.dtype == torch.float16
    assert got.dtype == torch.float32 and torch.equal(got.as_tensor().detach(), expected.as_tensor().float())
    got.as_tensor().sum().backward()
    assert x.grad is not None and (x.grad != 0).float().mean() > 0.5
    (cast,) = [s for s in check_bundle(target, scan)["preprocessing"] if s["transform"] == "CastToType"]
    assert "rounded to float16 as MONAI's cast rounds" in cast["stand_in"] and "identity gradient (BPDA)" in cast["stand_in"]


def _monai_bundle_run(bundle, scan, on_scan: bool = False):
    """MONAI's own run of ``bundle`` on ``scan`` (ConfigParser, its preprocessing, inferer and postprocessing, the
    evaluator's way: the network's output as a MetaTensor carrying the preprocessed image's metadata); ``on_scan``: a
    prediction its postprocessing leaves on the model's grid (no Invertd) put on the scan's, nearest, as a viewer
    overlays it."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": str(scan)})
    from medis3d.bundle import load_bundle

    network = load_bundle(bundle).network
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    data["pred"] = MetaTensor(logits, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    pred = parser.get_parsed_content("postprocessing")(data)["pred"]
    if on_scan and pred.applied_operations:
        from monai.transforms.utils import convert_applied_interp_mode

        ops = convert_applied_interp_mode([dict(op) for op in pred.applied_operations], mode="nearest")
        pred = preprocessing.inverse({"image": MetaTensor(pred.float(), meta=pred.meta, applied_operations=ops)})["image"]
    return pred


@pytest.mark.parametrize("nearest", [None, True])
def test_probabilities_go_back_as_the_bundles_invertd_takes_them_nearest(tiny_bundle, tmp_path, scan_file, nearest):
    """Invertd maps the probabilities back with nearest interpolation unless the config sets nearest_interp false
    (its default is true); medis3d always interpolated them, so the prediction differed from MONAI's run of the
    bundle on 288 of 46,080 voxels of the tiny bundle's scan (Dice 0.950). Now it is the same voxel for voxel."""
    import json
    import shutil

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"}
    if nearest is not None:
        invert["nearest_interp"] = nearest
    post = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [post[0], invert, post[1]]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    expected = _monai_bundle_run(bundle, scan_file)[0].numpy()
    target = load_bundle(bundle)
    vol = read_volume(scan_file)
    assert np.array_equal(target.predict(vol), expected)
    evaluation = target.evaluate(torch.from_numpy(vol.array), vol, lambda logits: logits[:, 1].sum())
    assert evaluation.gradient().abs().sum() > 0


@pytest.fixture(scope="module")
def sigmoid_bundle(tmp_path_factory):
    """The tiny bundle with one sigmoid channel (trained a few seconds) and a postprocessing of Invertd, then
    AsDiscreted(threshold=0.3)."""
    import json

    from monai.losses import DiceCELoss

    from conftest import TINY_CONFIG, train_tiny_unet

    bundle = tmp_path_factory.mktemp("sigmoid_bundle")
    (bundle / "configs").mkdir()
    (bundle / "models").mkdir()
    config = json.loads(json.dumps(TINY_CONFIG))
    config["network_def"]["out_channels"] = 1
    config["postprocessing"]["transforms"] = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.3}]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    net = train_tiny_unet(1, lambda seg: seg[None], DiceCELoss(sigmoid=True), steps=60)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_a_sigmoid_bundles_threshold_decides_the_prediction(sigmoid_bundle, tmp_path, scan_file):
    """AsDiscreted(threshold=0.3) was ignored: medis3d made a voxel foreground at 0.5, so its prediction differed from
    MONAI's run of the bundle on 572 of 46,080 voxels (Dice 0.926). Now the sigmoid logits are taken relative to the
    threshold, and the prediction is MONAI's voxel for voxel, in model space too (AsDiscreted before Invertd)."""
    import json
    import shutil

    from medis3d.bundle import load_bundle

    vol = read_volume(scan_file)
    expected = _monai_bundle_run(sigmoid_bundle, scan_file).numpy()
    target = load_bundle(sigmoid_bundle)
    assert target.threshold == 0.3
    assert np.array_equal(target.predict(vol), expected)
    bundle = tmp_path / "bundle"
    shutil.copytree(sigmoid_bundle, bundle)  # the fixture is the module's: left as it is
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    post = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [post[0], post[2], dict(post[1], nearest_interp=True)]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    assert np.array_equal(load_bundle(bundle).predict(vol), _monai_bundle_run(bundle, scan_file).numpy())


@pytest.mark.parametrize("activation, discrete, why", [
    ("softmax", {"threshold": 0.5}, "AsDiscreted threshold"), ("sigmoid", {"threshold": 1.0}, "AsDiscreted threshold"),
    ("sigmoid", {"argmax": True}, "AsDiscreted argmax after a sigmoid")])
def test_a_threshold_medis3d_cannot_take_is_refused_in_one_line(tiny_bundle, tmp_path, activation, discrete, why):
    """An argmax over sigmoid channels gives MONAI one label map where medis3d gave one 0/1 map per channel (a
    three-channel sigmoid bundle: MONAI's prediction had 1 channel, medis3d's 3); now refused, as a threshold medis3d
    cannot take is."""
    import json
    import shutil

    from medis3d.bundle import load_bundle
    from medis3d.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"] = [{"_target_": "Activationsd", "keys": "pred", activation: True},
                                              {"_target_": "AsDiscreted", "keys": "pred", **discrete}]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=why) as info:
        load_bundle(bundle)
    assert str(bundle) in str(info.value) and "\n" not in str(info.value)


def test_an_overlap_given_per_axis_is_taken_as_monai_takes_it(tiny_bundle, tmp_path, scan_file):
    """SlidingWindowInferer takes one overlap per axis; medis3d's loader failed on it with a traceback ("float()
    argument must be a string or a real number, not 'list'"). Now the windows are MONAI's, voxel for voxel."""
    import json
    import shutil

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["inferer"]["overlap"] = [0.25, 0.5, 0.0]
    config["postprocessing"]["transforms"].insert(1, {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                                                      "orig_keys": "image", "nearest_interp": False})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    target = load_bundle(bundle)
    assert target.settings()["inferer"]["overlap"] == [0.25, 0.5, 0.0]
    assert np.array_equal(target.predict(read_volume(scan_file)), _monai_bundle_run(bundle, scan_file)[0].numpy())


@pytest.mark.parametrize("softmax_after", [False, True])
def test_logits_go_back_as_the_bundles_invertd_takes_them_where_nothing_activates_them_first(
        tiny_bundle, tmp_path, scan_file, softmax_after):
    """With no Activationsd before Invertd, MONAI interpolates the network's logits back to the scan's grid and takes
    the argmax there; medis3d interpolated the softmax probabilities instead, so its prediction differed from MONAI's
    run of the bundle on 135 of 46,080 voxels of the tiny bundle's scan (Dice 0.976). Now it is the same voxel for voxel."""
    import json
    import shutil

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    softmax, argmax = config["postprocessing"]["transforms"]
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False}
    config["postprocessing"]["transforms"] = [invert, softmax, argmax] if softmax_after else [invert, argmax]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    target = load_bundle(bundle)
    vol = read_volume(scan_file)
    assert np.array_equal(target.predict(vol), _monai_bundle_run(bundle, scan_file)[0].numpy())
    assert target.evaluate(torch.from_numpy(vol.array), vol, lambda logits: logits[:, 1].sum()).gradient().abs().sum() > 0
    from medis3d.bundle_check import _other_steps  # and bundle check says so

    assert "(as the bundle's Invertd, on the logits)" in _other_steps(target)[2]["stand_in"]


def test_an_invertd_that_interpolates_a_label_map_is_refused_in_one_line(tiny_bundle, tmp_path):
    """AsDiscreted(argmax), then Invertd(nearest_interp=False): MONAI interpolates the class indices themselves
    (2,644 voxels of the tiny bundle's scan get values between classes, which no class has); medis3d inverted them with
    nearest interpolation without a word, and MONAI's map rounded differs from that on 225 of 46,080 voxels (Dice
    0.961). Now refused in one line."""
    import json
    import shutil

    from medis3d.bundle import load_bundle
    from medis3d.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"].append({"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                                                   "orig_keys": "image", "nearest_interp": False})
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="Invertd with nearest_interp false after AsDiscreted") as info:
        load_bundle(bundle)
    assert str(bundle) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_a_sigmoid_prediction_where_the_inverse_pads_is_the_bundles(sigmoid_bundle, tmp_path, scan_file, threshold):
    """Where the preprocessing crops (here ResizeWithPadOrCropd to 24^3 after the resampling), Invertd pads the
    probability with 0 and interpolates it with that 0 at the crop's edge; medis3d's logit from a channel and its
    complement, both padded, cancelled the padding, so a sigmoid prediction differed from MONAI's run of the bundle on
    139 of 46,080 voxels (Dice 0.980) at threshold 0.5, and on 16,436 (Dice 0.321) at 0.3, where every padded voxel
    became foreground. Now it is the same voxel for voxel."""
    import json
    import shutil

    from medis3d.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(sigmoid_bundle, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].insert(5, {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [24, 24, 24]})
    config["postprocessing"]["transforms"][2]["threshold"] = threshold
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    vol = read_volume(scan_file)
    assert np.array_equal(load_bundle(bundle).predict(vol), _monai_bundle_run(bundle, scan_file).numpy())


def _with_post(source, tmp_path, post):
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"] = post
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    return bundle


SOFTMAX = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
INVERT = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"}
ARGMAX = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
LARGEST = {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]}


@pytest.mark.parametrize("name, post", [
    ("largest component on the scan's grid", [SOFTMAX, INVERT, ARGMAX, LARGEST]),
    ("largest component on the model's grid, no Invertd", [SOFTMAX, ARGMAX, LARGEST]),
    ("largest component on a one-hot map in model space, then Invertd",
     [SOFTMAX, dict(ARGMAX, to_onehot=2), {"_target_": "KeepLargestConnectedComponentd", "keys": ["pred"]}, INVERT]),
    ("small objects (in mm^3) removed, holes filled",
     [SOFTMAX, INVERT, ARGMAX, {"_target_": "monai.transforms.RemoveSmallObjectsd", "keys": "pred", "min_size": 2000,
                                "by_measure": True}, {"_target_": "FillHolesd", "keys": "pred", "applied_labels": [1]}]),
])
def test_label_map_postprocessing_is_applied_as_the_bundle_applies_it(tiny_bundle, tmp_path, scan_file, name, post):
    """A bundle with KeepLargestConnectedComponentd (or RemoveSmallObjectsd, FillHolesd, LabelFilterd) was refused;
    ignoring it (before that) scored another label map than the bundle's: keeping the largest component changes 1,042 of
    the tiny bundle's 46,080 voxels. Now each is MONAI's own transform on every prediction, where the bundle applies it
    (model grid before Invertd, scan grid after), and the prediction is MONAI's run of the bundle voxel for voxel;
    the attack's gradient passes around the step, and an attack still lowers Dice."""
    from medis3d.bundle import load_bundle
    from medis3d.fusion import MedIS
    from medis3d.metrics import mean_dice
    from medis3d.postprocessing import step_name

    bundle = _with_post(tiny_bundle, tmp_path, post)
    target = load_bundle(bundle)
    assert len(target.label_steps) == 1 + (name.startswith("small"))
    assert any("applied to every prediction" in n for n in target.notices)
    vol = read_volume(scan_file)
    run = _monai_bundle_run(bundle, scan_file, on_scan=True).round().numpy()
    expected = run.argmax(0) if run.shape[0] > 1 else run[0]  # a one-hot map's class (a voxel in no channel: background)
    got = target.predict(vol)
    assert np.array_equal(got, expected)
    without = load_bundle(_with_post(tiny_bundle, tmp_path / "plain", [p for p in post if step_name(p["_target_"]) is None]))
    assert (without.predict(vol) != got).sum() > 0, "the step changes nothing on this scan: the test cannot fail"
    assert target.fingerprint() != without.fingerprint()
    result = MedIS(target, members_spec=["apgd:ce"], eps=16 / 255, steps=5)(vol)
    assert np.array_equal(result.clean_prediction, got)
    adversarial = target.predict(result.adversarial)
    assert np.array_equal(result.members[0].prediction, adversarial)  # the reported prediction is the bundle's
    assert mean_dice(target.masks(adversarial), target.masks(got)) < 0.8


def test_a_label_filter_keeps_the_classes_monai_keeps():
    """LabelFilterd on a three-class label map (the tiny bundle has one class, where it changes nothing): MONAI's."""
    from monai.transforms import LabelFilter

    from medis3d.postprocessing import LabelStep, apply

    labels = torch.randint(0, 3, (1, 6, 5, 4)).to(torch.uint8)
    step = LabelStep("LabelFilter", {"applied_labels": [2]})
    got = apply((step,), labels, np.eye(4), "softmax")
    assert torch.equal(got, LabelFilter(applied_labels=[2])(labels)) and got.dtype == torch.uint8
    assert set(got.unique().tolist()) == {0, 2}


@pytest.mark.parametrize("step, why", [
    ({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1], "fill": 3}, "takes no argument fill"),
    ({"_target_": "MeanEnsembled", "keys": "pred"}, "postprocessing step MeanEnsembled is not supported"),
])
def test_a_label_map_step_medis3d_cannot_apply_is_refused_in_one_line(tiny_bundle, tmp_path, step, why):
    from medis3d.bundle import load_bundle
    from medis3d.errors import BundleError

    for post in ([SOFTMAX, INVERT, ARGMAX, step], [SOFTMAX, step, INVERT, ARGMAX]):
        bundle = _with_post(tiny_bundle, tmp_path / str(len(list(tmp_path.iterdir()))), post)
        reason = why if post[-1] is step or "Mean" in why else "before the prediction's AsDiscreted is not supported"
        with pytest.raises(BundleError, match=reason) as info:
            load_bundle(bundle)
        assert str(bundle) in str(info.value) and "\n" not in str(info.value)


def test_a_sigmoid_bundles_largest_component_is_monais(sigmoid_bundle, tmp_path, scan_file):
    """KeepLargestConnectedComponentd after a sigmoid bundle's threshold, on its 0/1 channel: MONAI's voxel for voxel."""
    import json

    from medis3d.bundle import load_bundle

    post = json.loads((sigmoid_bundle / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    bundle = _with_post(sigmoid_bundle, tmp_path, [*post, {"_target_": "KeepLargestConnectedComponentd", "keys": "pred"}])
    vol = read_volume(scan_file)
    got = load_bundle(bundle).predict(vol)
    assert np.array_equal(got, _monai_bundle_run(bundle, scan_file).numpy())
    assert (got != load_bundle(sigmoid_bundle).predict(vol)).sum() > 0


def test_a_label_map_step_whose_package_is_missing_is_refused_in_one_line(tiny_bundle, tmp_path, monkeypatch):
    """MONAI's KeepLargestConnectedComponent raises "Skimage.measure required." on the first prediction without
    scikit-image: refused when the bundle is loaded instead, naming the package to install; bundle check lists the
    step with its stand-in where it is there."""
    from medis3d import postprocessing
    from medis3d.bundle import load_bundle
    from medis3d.bundle_check import check_bundle
    from medis3d.errors import BundleError

    bundle = _with_post(tiny_bundle, tmp_path, [SOFTMAX, INVERT, ARGMAX, LARGEST])
    rows = check_bundle(load_bundle(bundle))["other_non_differentiable_steps"]
    assert rows[-1]["step"] == "KeepLargestConnectedComponentd (postprocessing)" and "identity gradient" in rows[-1]["stand_in"]
    monkeypatch.setitem(postprocessing.LABEL_MAP_STEPS, "KeepLargestConnectedComponent", "skimage.no_such_module")
    with pytest.raises(BundleError, match=r"KeepLargestConnectedComponentd cannot be used \(MONAI's KeepLargestConnectedComponent "
                                          r"needs scikit-image \(pip install scikit-image\)\)"):
        load_bundle(bundle)

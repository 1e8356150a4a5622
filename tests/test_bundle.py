"""Bundles: safe loading refuses code, real model-zoo configs load and attack, bundle check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medis3d.bundle import load_bundle
from medis3d.cli import app
from medis3d.errors import BundleError

runner = CliRunner()
ZOO = Path(__file__).resolve().parent.parent.parent / "shared" / "model-zoo"
needs_zoo = pytest.mark.skipif(not ZOO.is_dir(), reason="../shared/model-zoo is not present beside the checkout")


def _bundle(tmp_path: Path, config: dict, weights=None) -> Path:
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    if weights is not None:
        torch.save(weights, root / "models" / "model.pt")
    return root


NET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_dollar_expression_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    net = dict(NET, spatial_dims=f"$__import__('pathlib').Path('{marker}').write_text('x') and 3")
    with pytest.raises(BundleError, match="refused to evaluate"):
        load_bundle(_bundle(tmp_path, {"network_def": net}))
    assert not marker.exists()


def test_foreign_target_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(BundleError, match="refused _target_ 'os.system'"):
        load_bundle(_bundle(tmp_path, {"network_def": {"_target_": "os.system", "command": f"touch {marker}"}}))
    assert not marker.exists()


def test_pickle_with_code_in_weights_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(BundleError, match="weights_only"):
        load_bundle(_bundle(tmp_path, {"network_def": NET}, weights={"model": _Evil(marker)}))
    assert not marker.exists()


def test_refused_bundle_on_the_command_line_is_one_line(tmp_path, scan_file):
    bundle = _bundle(tmp_path, {"network_def": {"_target_": "os.system", "command": "true"}})
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(bundle), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "--trust-bundle" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_trusted_bundle_evaluates_expressions(tmp_path):
    net = dict(NET, out_channels="$1 + 1")
    target = load_bundle(_bundle(tmp_path, {"network_def": net}), trust=True, random_weights=True)
    assert target.out_channels == 2


def test_checkpoint_dict_weights_and_zip(tmp_path):
    from monai.networks.nets import UNet

    net = UNet(3, 1, 2, (4, 8), (2,))
    root = _bundle(tmp_path, {"network_def": NET}, weights={"model": net.state_dict(), "epoch": 3})
    target = load_bundle(root)
    for a, b in zip(target.network.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    archive = shutil.make_archive(str(tmp_path / "b"), "zip", root.parent, root.name)
    assert load_bundle(archive).name == "UNet"


def test_normalize_intensity_nonzero_is_differentiable(tmp_path):
    from monai.transforms import NormalizeIntensity

    from medis3d.preprocessing import NormalizeIntensityDiff

    x = torch.rand(1, 8, 9, 10)
    x[:, :2] = 0
    for kwargs in ({"nonzero": True}, {"nonzero": False}, {"nonzero": True, "channel_wise": True}):
        ours = NormalizeIntensityDiff(**kwargs)(x.clone().requires_grad_(True))
        assert torch.allclose(ours, NormalizeIntensity(**kwargs)(x.clone()), atol=1e-5)
        assert ours.requires_grad


# --- real third-party bundle configs -----------------------------------------------------
def _zoo_copy(name: str, tmp_path: Path, roi: int | None = None) -> Path:
    """A temporary copy of a model-zoo bundle with random weights as models/model.pt (and, for CPU, its
    sliding window's ``roi_size`` set to ``roi``: both medis3d and MONAI then run that configuration)."""
    src = ZOO / name
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if roi is not None:
        config = dst / "configs" / "inference.json"
        parsed = json.loads(config.read_text())
        parsed["inferer"]["roi_size"] = [roi] * 3
        config.write_text(json.dumps(parsed, indent=2))
    (dst / "models").mkdir(exist_ok=True)
    target = load_bundle(dst, random_weights=True)  # random init, saved as the copy's weights
    torch.manual_seed(0)
    torch.save(target.network.state_dict(), dst / "models" / "model.pt")
    return dst


def _ct(tmp_path: Path, shape=(72, 64, 40), spacing=(1.6, 1.6, 2.5)) -> Path:
    import nibabel as nib
    from monai.data import create_test_image_3d

    img, _ = create_test_image_3d(*shape, num_objs=6, rad_max=10, noise_max=0.1, random_state=np.random.RandomState(1))
    hu = (img * 300 - 100).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def _monai_prediction(bundle: Path, scan: Path, network: torch.nn.Module) -> np.ndarray:
    """MONAI's own bundle inference: its preprocessing, inferer and postprocessing (minus saving)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    try:
        import itk  # noqa: F401
    except ImportError:  # the bundle asks for ITKReader; nibabel reads the same NIfTI geometry
        for t in parser["preprocessing"]["transforms"]:
            t.pop("reader", None)
    post = parser["postprocessing"]["transforms"]
    parser["postprocessing"]["transforms"] = [t for t in post if "SaveImage" not in t["_target_"]]
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    data = pre({"image": str(scan)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    return np.asarray(parser.get_parsed_content("postprocessing")(data)["pred"])[0]


@needs_zoo
@pytest.mark.parametrize("name,roi", [("spleen_ct_segmentation", None),  # the bundle's own 96^3 windows
                                      ("wholeBody_ct_segmentation", 64), ("swin_unetr_btcv_segmentation", 64)])
def test_model_zoo_bundle_agrees_with_monai_and_attacks(name, roi, tmp_path):
    bundle = _zoo_copy(name, tmp_path, roi)
    # the two large networks on a scan that one 64^3 window covers at their spacing (CPU time)
    scan = _ct(tmp_path) if roi is None else _ct(tmp_path, shape=(56, 48, 28))
    target = load_bundle(bundle)
    from medis3d.io import read_volume
    from medis3d.metrics import dice_per_class

    volume = read_volume(scan)
    ours = target.predict(volume)
    theirs = _monai_prediction(bundle, scan, target.network)
    assert theirs.shape == ours.shape == volume.spatial_shape
    # random weights predict scattered labels, so compare voxel by voxel, and by Dice where a class is large
    assert (ours == theirs).mean() >= 0.99
    for c in np.unique(theirs):
        if (theirs == c).sum() > 1000:
            assert dice_per_class((ours == c)[None], (theirs == c)[None])[0] >= 0.99
    # an attack runs end to end through the bundle's own preprocessing (smaller windows for CPU)
    out = tmp_path / "out"
    result = runner.invoke(app, ["attack", str(scan), "--bundle", str(bundle), "--roi", "64", "--sw-batch-size", "1",
                                 "--losses", "ce", "--steps", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output)
    assert report["target"]["network"] in ("UNet", "SegResNet", "SwinUNETR")
    assert report["perturbation"]["linf_normalized"] <= 10 / 255 + 1e-3


@needs_zoo
def test_bundle_check_reports_preprocessing_and_gradient(tmp_path):
    bundle = _zoo_copy("spleen_ct_segmentation", tmp_path)
    result = runner.invoke(app, ["bundle", "check", str(bundle), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads(result.output)
    steps = {s["transform"]: s["gradient"] for s in report["preprocessing"]}
    assert steps == {"Orientation": "exact", "Spacing": "exact", "ScaleIntensityRange": "straight-through clamp"}
    assert report["gradient"]["ok"] and report["gradient"]["input_grad_norm"] > 0
    assert report["parameters"] > 1000


def test_bare_network_torchscript_and_state_dict(tmp_path, scan_file):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (4, 8), (2,)).eval()
    torch.jit.script(net).save(str(tmp_path / "model.ts"))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "net.json").write_text(json.dumps({"network_def": NET}))
    outputs = []
    for args in (["--network", str(tmp_path / "model.ts")], ["--network", str(tmp_path / "model.pt"), "--network-def", str(tmp_path / "net.json")]):
        out = tmp_path / f"pred{len(outputs)}.nii.gz"
        result = runner.invoke(app, ["predict", str(scan_file), *args, "--transforms", "ct_wide", "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs.append(np.asarray(__import__("nibabel").load(str(out)).dataobj))
    assert np.array_equal(outputs[0], outputs[1])  # the same network either way
    missing = runner.invoke(app, ["predict", str(scan_file), "--network", str(tmp_path / "model.pt"), "--out", str(tmp_path / "x.nii.gz")])
    assert missing.exit_code == 2 and "--network-def" in missing.output
    unknown = runner.invoke(app, ["predict", str(scan_file), "--network", str(tmp_path / "model.ts"), "--transforms", "nope", "--out", str(tmp_path / "y.nii.gz")])
    assert unknown.exit_code == 2 and "ct_abdomen" in unknown.output
    # without --network they would be ignored (the bundle brings its own network and preprocessing): refused
    for command in (["predict", str(scan_file), "--out", str(tmp_path / "z.nii.gz")],
                    ["attack", str(scan_file), "--steps", "1", "--out", str(tmp_path / "attack")]):
        for extra, named in ((["--transforms", "ct_wide"], "--transforms goes with --network"),
                             (["--network-def", str(tmp_path / "net.json"), "--transforms", "x"],
                              "--network-def and --transforms go with --network")):
            alone = runner.invoke(app, [*command, *extra])
            assert alone.exit_code == 2 and named in alone.output, alone.output
            assert "Traceback" not in alone.output
    assert not (tmp_path / "z.nii.gz").exists() and not (tmp_path / "attack").exists()


def test_shipped_bundle_by_name_and_local_folders_first(tmp_path, monkeypatch):
    from medis3d.bundle import resolve_bundle_path, shipped_bundles

    shipped = shipped_bundles()
    assert {"brain_t1_segresnet", "brain_t1_unetr"} <= set(shipped)
    assert resolve_bundle_path(None) == shipped["brain_t1_segresnet"]
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle_path("brain_t1_unetr") == shipped["brain_t1_unetr"]
    local = _bundle(tmp_path, {"network_def": NET}).rename(tmp_path / "brain_t1_unetr")  # a folder of that name wins
    assert resolve_bundle_path("brain_t1_unetr") == Path("brain_t1_unetr") and load_bundle("brain_t1_unetr", random_weights=True).name == "UNet"
    with pytest.raises(BundleError, match="brain_t1_segresnet, brain_t1_segresnet_robust, brain_t1_unetr"):
        resolve_bundle_path("no_such_bundle")
    with pytest.raises(BundleError, match="no such bundle"):  # a path, not a bare name: never a shipped bundle
        resolve_bundle_path(local.parent / "sub" / "brain_t1_segresnet")


def test_shipped_bundles_from_a_wheel_install(tmp_path, monkeypatch):
    """Without the checkout's bundles/, shipped bundles are found where a wheel puts them."""
    import sys

    import medis3d.bundle as bundle_module

    installed = tmp_path / "prefix" / "share" / "medis3d" / "bundles"
    for name in ("brain_t1_segresnet", "brain_t1_unetr"):
        (installed / name / "configs").mkdir(parents=True)
    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE", tmp_path / "checkout" / "bundles" / "brain_t1_segresnet")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.chdir(tmp_path)
    assert bundle_module.default_bundle_path() == installed / "brain_t1_segresnet"
    assert bundle_module.resolve_bundle_path("brain_t1_unetr") == installed / "brain_t1_unetr"


def test_preprocessing_presets_from_a_wheel_install(tmp_path, monkeypatch):
    """The wheel installs every preset of transforms/ under share/medis3d/transforms, and --network finds them there
    without the checkout's folder."""
    import shutil
    import sys
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import medis3d.bundle as bundle_module

    checkout = Path(bundle_module.__file__).resolve().parent.parent
    data_files = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed_by_wheel = {p.name for pattern in data_files["share/medis3d/transforms"] for p in checkout.glob(pattern)}
    presets = sorted(checkout.glob("transforms/*.json"))
    assert presets and {p.name for p in presets} <= installed_by_wheel
    installed = tmp_path / "prefix" / "share" / "medis3d" / "transforms"
    installed.mkdir(parents=True)
    for preset in presets:
        shutil.copy(preset, installed / preset.name)
    monkeypatch.setattr(bundle_module, "TRANSFORMS_DIR", tmp_path / "checkout" / "transforms")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    data, path = bundle_module.transforms_preset("mr_t1_brain")
    assert path == installed / "mr_t1_brain.json" and "preprocessing" in data
    with pytest.raises(BundleError, match=r"no such preprocessing preset or file \(presets: ct_abdomen, "):
        bundle_module.transforms_preset("no_such_preset")


# -- hostile bundles: refused with one line, nothing written outside a temporary folder that is removed
def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    import stat
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of the test's own (other tests unpack bundles in parallel)."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _bundle_temps(folder: Path) -> list[Path]:
    return list(folder.glob("medis3d-bundle-*"))


@pytest.mark.parametrize("name, why", [("../escaped.txt", "outside the bundle"), ("/tmp/escaped-absolute.txt", "outside the bundle"),
                                       ("bundle/configs/../../../escaped.txt", "outside the bundle")])
def test_zip_entries_outside_the_bundle_refused(tmp_path, private_tmp, name, why):
    config = json.dumps({"network_def": NET}).encode()
    archive = _zip(tmp_path / "evil.zip", {"bundle/configs/inference.json": config, name: b"pwned"})
    with pytest.raises(BundleError, match=why):
        load_bundle(archive)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped-absolute.txt").exists()
    assert _bundle_temps(private_tmp) == []  # the temporary folder is removed


def test_zip_links_and_zip_bombs_refused(tmp_path, private_tmp, monkeypatch):
    import medis3d.bundle as bundle_module

    config = json.dumps({"network_def": NET}).encode()
    linked = _zip(tmp_path / "link.zip", {"bundle/configs/inference.json": config}, links={"bundle/models/model.pt": "/etc/passwd"})
    with pytest.raises(BundleError, match="refused a link inside the archive"):
        load_bundle(linked)
    monkeypatch.setattr(bundle_module, "MAX_ZIP_BYTES", 1000)  # a bomb declares its size; no need to build a real one
    big = _zip(tmp_path / "big.zip", {"bundle/configs/inference.json": config, "bundle/models/pad.bin": bytes(5000)})
    with pytest.raises(BundleError, match="unpacks to .* refused"):
        load_bundle(big)
    assert _bundle_temps(private_tmp) == []


def test_zip_bundle_loads_and_leaves_no_temporary_folder(tmp_path, private_tmp):
    from monai.networks.nets import UNet

    root = _bundle(tmp_path, {"network_def": NET}, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict())
    archive = shutil.make_archive(str(tmp_path / "b"), "zip", root.parent, root.name)
    target = load_bundle(archive)
    assert target.source == archive and _bundle_temps(private_tmp) == []


@pytest.mark.parametrize("part", ["configs/inference.json", "models/model.pt", "configs/metadata.json"])
def test_links_out_of_a_bundle_folder_refused(tmp_path, part):
    from monai.networks.nets import UNet

    root = _bundle(tmp_path, {"network_def": NET}, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict())
    (root / "configs" / "metadata.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    moved = outside / Path(part).name
    (root / part).rename(moved)
    (root / part).symlink_to(moved)
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_bundle(root)
    line = runner.invoke(app, ["bundle", "check", str(root)]).output.strip().splitlines()
    assert len(line) == 1 and "leads outside the bundle" in line[0]


def test_config_outside_the_bundle_refused(tmp_path):
    root = _bundle(tmp_path, {"network_def": NET})
    (tmp_path / "elsewhere.json").write_text(json.dumps({"network_def": NET}))
    with pytest.raises(BundleError, match="refused the config: it leads outside the bundle"):
        load_bundle(root, config="../elsewhere.json")
    # a config that pulls part of another file in by reference (MONAI's % macro): never read by the safe loader
    included = dict(NET, channels=f"%{tmp_path / 'elsewhere.json'}::network_def::channels")
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": included}))
    with pytest.raises(BundleError, match="macro .* is not supported by the safe loader"):
        load_bundle(root)


def test_enormous_configs_refused(tmp_path, monkeypatch):
    import medis3d.safe_config as config_module

    root = _bundle(tmp_path, {"network_def": NET, "padding": "x" * 3000})
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", 2000)
    with pytest.raises(BundleError, match="the config is .* MB; bundle configs are kilobytes"):
        load_bundle(root)
    monkeypatch.undo()
    # a YAML "billion laughs": a few hundred bytes that expand to 10^9 values through aliases
    laughs = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    (root / "configs" / "inference.json").unlink()
    (root / "configs" / "inference.yaml").write_text("\n".join(laughs) + "\nnetwork_def: *i\n")
    with pytest.raises(BundleError, match="expands to more than 1,000,000 values"):
        load_bundle(root)


def test_a_bundle_without_weights_is_refused_not_randomly_initialised(tmp_path, scan_file):
    root = _bundle(tmp_path, {"network_def": NET})
    with pytest.raises(BundleError, match="the bundle has no weights"):
        load_bundle(root)
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(root), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "the bundle has no weights" in result.output and not (tmp_path / "out").exists()
    target = load_bundle(root, random_weights=True)  # asked for: allowed, and said
    assert any("random weights" in n for n in target.notices)
    check = runner.invoke(app, ["bundle", "check", str(root), "--json"])  # a config can be checked before it has weights
    assert check.exit_code == 0, check.output


def test_harmless_data_expressions_load_and_code_stays_refused(tmp_path):
    from monai.networks.nets import UNet

    net = dict(NET, out_channels="$max(len(@labels), 2)", channels="$[4, 8][:len(@labels)]", strides="$tuple([2])")
    config = {"imports": ["$import glob", "$import numpy"], "labels": ["background", "spleen"], "network_def": net,
              "dtype": "$torch.float32", "np_dtype": "$numpy.float32"}
    root = _bundle(tmp_path, config, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict())
    target = load_bundle(root)
    assert target.out_channels == 2 and target.name == "UNet"
    assert any("imports (glob, numpy) were not run" in n for n in target.notices)
    from medis3d.safe_config import SafeConfig

    cfg = SafeConfig(config, root / "configs" / "inference.json")
    assert cfg.resolve("$torch.float32", "dtype") is torch.float32 and cfg.resolve("$numpy.float32", "np") is np.float32
    assert cfg.resolve("$sorted(@labels)[-1]", "x") == "spleen" and cfg.resolve("$list(range(3))", "x") == [0, 1, 2]
    for code in ("$__import__('os').system('true')", "$open('/etc/passwd').read()", "$torch.load('x')", "$numpy.fromfile('x')",
                 "$getattr(@labels, 'append')", "$().__class__.__bases__", "$[0] * 10**9", "$list(range(10**12))",
                 "$glob.glob('*')", "$[i for i in @labels]", "$len(5)", "$" + "-" * 100000 + "1"):
        with pytest.raises(BundleError, match="refused to evaluate the Python expression") as info:
            cfg.resolve(code, "x")
        assert len(str(info.value)) < 400  # one readable line, even for a huge expression


def _with_window(tmp_path: Path, window: dict, name: str = "ScaleIntensityRanged") -> Path:
    from monai.networks.nets import UNet

    steps = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
             {"_target_": name, "keys": "image", **window}]
    config = {"network_def": NET, "preprocessing": {"_target_": "Compose", "transforms": steps},
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4}}
    return _bundle(tmp_path, config, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict())


@pytest.mark.parametrize("name, window, why", [
    ("ScaleIntensityRanged", dict(a_min=-100, a_max=300, b_min=1, b_max=0, clip=True), "b_min 1 > b_max 0 would make every voxel 0"),
    ("ScaleIntensityRanged", dict(a_min=-100, a_max=300, b_min=float("nan"), b_max=1, clip=True), "b_min is NaN"),
    ("ScaleIntensityRanged", dict(a_min=-100, a_max=300, b_min="0", b_max=1, clip=True), "b_min must be a number, got '0'"),
    ("ScaleIntensityRangePercentilesd", dict(lower=1, upper=99, b_min=1, b_max=0, clip=True), "b_min 1 > b_max 0"),
    ("ScaleIntensityRangePercentilesd", dict(lower=1, upper=99, b_min=None, b_max=None, clip=True, relative=True),
     "relative=True needs both b_min and b_max"),
])
def test_clip_bounds_the_clamp_cannot_use_are_refused_with_one_line(tmp_path, scan_file, name, window, why):
    """Found when the bundle is loaded, naming the step and the problem: not a silently constant (or NaN) model input,
    nor a traceback from the straight-through clamp on the first scan."""
    root = _with_window(tmp_path, window, name)
    with pytest.raises(BundleError, match=rf"preprocessing step {name} cannot be used \(.*{why}"):
        load_bundle(root)
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(root), "--out", str(tmp_path / "out"), "--quiet",
                                 "--steps", "1"])
    assert result.exit_code == 2 and why in result.output, result.output[-2000:]
    assert len(result.output.strip().splitlines()) == 1


def test_clip_without_bounds_and_a_zero_bound_still_load_and_run(tmp_path, scan_file):
    """A clip with no bound at all clips nothing on every gradient path (the exact one included); b_max=0 is a bound."""
    from medis3d.io import read_volume

    vol = read_volume(scan_file)
    x = torch.from_numpy(vol.array)
    for window, low, high in ((dict(a_min=-100, a_max=300, b_min=None, b_max=None, clip=True), -1.0, 1.5),
                              (dict(a_min=-100, a_max=300, b_min=-1, b_max=0, clip=True), -1.0, 0.0)):
        target = load_bundle(_with_window(tmp_path / str(high), window))
        for path in ("standard", "exact", "smooth"):
            model_in = target.model_input(x, vol, path)
            assert model_in.min() >= low and model_in.max() <= high and model_in.max() > model_in.min()
        assert target.evaluate(x, vol, lambda logits: logits.sum(), gradient="exact").grad.abs().sum() > 0


def test_zip_members_beside_the_folder_with_its_name_as_prefix_are_refused(tmp_path):
    """``../x_evil/...`` from a folder ``x``: a sibling whose name starts with the folder's is outside it."""
    from medis3d.bundle import _unpack_zip

    out = tmp_path / "x"
    out.mkdir()
    archive = _zip(tmp_path / "evil.zip", {"bundle/configs/inference.json": b"{}", "../x_evil/configs/inference.json": b"pwned"})
    with pytest.raises(BundleError, match=r"refused a zip entry outside the bundle \(../x_evil/configs/inference.json\)"):
        _unpack_zip(archive, out)
    assert not (tmp_path / "x_evil").exists() and list(out.iterdir()) == []


def test_bundle_check_in_a_log_keeps_its_table_readable(tiny_bundle):
    """Piped or logged (not a terminal), the table is laid out 160 columns wide: rich's 80 cut the transforms' names
    ("ScaleIntensi…") and folded every row over many lines."""
    result = runner.invoke(app, ["bundle", "check", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert "│ ScaleIntensityRange " in result.output and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) > 80


@pytest.mark.parametrize("step", [{"_target_": "VoteEnsembled", "keys": "pred"},
                                  {"_target_": "DistanceTransformEDTd", "keys": ["pred"]}])
def test_a_postprocessing_step_medis3d_does_not_apply_is_refused_in_one_line(tmp_path, scan_file, step):
    """A step that changes the prediction was ignored without a word (KeepLargestConnectedComponentd changed 1,042 of
    the tiny bundle's 46,080 voxels, Dice 0.777): medis3d scored its own label map, not the bundle's. The label-map steps
    are applied now (tests/test_target.py); any other such step is refused in one line naming it; steps that only save,
    copy or convert, and steps on other keys, are still taken."""
    from monai.networks.nets import UNet

    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    config = {"network_def": NET, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]},
              "preprocessing": {"_target_": "Compose", "transforms": [{"_target_": "LoadImaged", "keys": "image"}]},
              "postprocessing": {"_target_": "Compose", "transforms": [*post, step]}}
    root = _bundle(tmp_path, config, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict())
    with pytest.raises(BundleError, match=f"postprocessing step {step['_target_']} is not supported"):
        load_bundle(root)
    result = runner.invoke(app, ["attack", str(scan_file), "--bundle", str(root), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and str(root) in result.output and step["_target_"] in result.output
    assert len(result.output.strip().splitlines()) == 1
    config["postprocessing"]["transforms"] = [*post, dict(step, keys="label"), {"_target_": "SaveImaged", "keys": "pred"}]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    assert load_bundle(root).activation == "softmax"


def test_an_asdiscreted_of_the_label_does_not_make_the_prediction_inverted_as_labels(tmp_path, scan_file):
    """An AsDiscreted of the ``label`` key before the prediction's Invertd (a bundle one-hot encoding its labels for
    a metric) made medis3d invert the prediction as labels (nearest, after the argmax) where the bundle inverts its
    probabilities; with ``nearest_interp`` false the bundle was even refused. Only the prediction's steps count now."""
    from monai.networks.nets import UNet

    pre = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
           {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0]}]
    post = [{"_target_": "AsDiscreted", "keys": "label", "to_onehot": 2},
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    config = {"network_def": NET, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]},
              "preprocessing": {"_target_": "Compose", "transforms": pre}, "postprocessing": {"_target_": "Compose", "transforms": post}}
    target = load_bundle(_bundle(tmp_path, config, weights=UNet(3, 1, 2, (4, 8), (2,)).state_dict()))
    assert target.invert == "probabilities" and not target.invert_nearest


def test_bundle_check_tells_the_resampling_and_the_threshold_the_bundle_uses(tmp_path):
    """bundle check said "bilinear grid sampling" for every bundle's resampling, a nearest Spacing and a nearest
    Invertd included, and nothing of a sigmoid bundle's threshold; it now tells both as the bundle does them."""
    from monai.networks.nets import UNet

    from medis3d.bundle_check import check_bundle

    pre = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
           {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "nearest"}]
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.4}]
    config = {"network_def": dict(NET, out_channels=1), "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]},
              "preprocessing": {"_target_": "Compose", "transforms": pre}, "postprocessing": {"_target_": "Compose", "transforms": post}}
    report = check_bundle(load_bundle(_bundle(tmp_path, config, weights=UNet(3, 1, 1, (4, 8), (2,)).state_dict())))
    decision, _, resampling = report["other_non_differentiable_steps"]
    assert "threshold 0.4" in decision["stand_in"]
    assert resampling["stand_in"].startswith("nearest grid sampling forward, nearest back to the scan's grid")
    assert "bilinear" not in resampling["stand_in"]

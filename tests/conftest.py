"""Shared fixtures: small synthetic CT-like scans and a tiny trained bundle (CPU, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

# the cores this process may use, shared among pytest-xdist's workers (one thread each on two cores), and the
# same share for the processes a test starts: more threads than cores makes OpenMP spin and everything crawl
THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

SCAN_AFFINE = np.array(  # LAS, 1.2 mm: the bundle's Orientation and Spacing both do real work
    [[-1.2, 0, 0, 40.0], [0, 1.2, 0, -20.0], [0, 0, 1.2, 5.0], [0, 0, 0, 1]]
)

TINY_CONFIG = {
    "image_key": "image",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [8, 16, 32],
        "strides": [2, 2],
        "num_res_units": 1,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -100, "a_max": 300, "b_min": 0, "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    },
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 24], "sw_batch_size": 4, "overlap": 0.25, "mode": "gaussian"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
    },
}


def synthetic_scan(seed: int, shape=(40, 36, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 scan (HU-ish) with bright blobs, and their mask."""
    from monai.data import create_test_image_3d

    image, seg = create_test_image_3d(*shape, num_objs=6, rad_max=7, rad_min=4, noise_max=0.15, num_seg_classes=1, random_state=np.random.RandomState(seed))
    hu = (image * 250 - 50).round().astype(np.int16)
    return hu, (seg > 0).astype(np.uint8)


def save_nifti(path: Path, array: np.ndarray, affine=SCAN_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def train_tiny_unet(out_channels: int = 2, labels=None, loss_fn=None, steps: int = 120) -> torch.nn.Module:
    """A tiny UNet trained for a few seconds on synthetic blob scans, in the tiny bundle's model space.

    ``labels(seg)`` turns a scan's blob mask ``(I, J, K)`` into the training target on the scan's
    grid, ``(1, ...)`` class indices (default) or ``(C, ...)`` channels; ``loss_fn`` matches it
    (default: softmax Dice + CE on class indices)."""
    from monai.data import MetaTensor
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import Orientation, ScaleIntensityRange, Spacing

    labels = labels or (lambda seg: seg[None])
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    xs, ys = [], []
    for seed in range(6):
        hu, seg = synthetic_scan(100 + seed)
        aff = torch.as_tensor(SCAN_AFFINE)
        img = MetaTensor(torch.from_numpy(hu[None].astype(np.float32)), affine=aff)
        lab = MetaTensor(torch.from_numpy(np.asarray(labels(seg), dtype=np.float32)), affine=aff)
        img = ScaleIntensityRange(-100, 300, 0, 1, clip=True)(Spacing((1.5, 1.5, 1.5), mode="bilinear")(Orientation("RAS")(img)))
        lab = Spacing((1.5, 1.5, 1.5), mode="nearest")(Orientation("RAS")(lab))
        xs.append(img.as_tensor())
        ys.append(lab.as_tensor().round())
    rng = np.random.RandomState(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = loss_fn or DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for _ in range(steps):
        crops_x, crops_y = [], []
        for img, lab in zip(xs, ys):  # random 24^3 crops, the inferer's window size
            o = [rng.randint(0, s - 24 + 1) for s in img.shape[1:]]
            window = (slice(None), *(slice(a, a + 24) for a in o))
            crops_x.append(img[window])
            crops_y.append(lab[window])
        opt.zero_grad()
        loss = loss_fn(net(torch.stack(crops_x)), torch.stack(crops_y))
        loss.backward()
        opt.step()
    return net.eval()


def _train(bundle: Path) -> None:
    torch.save(train_tiny_unet().state_dict(), bundle / "models" / "model.pt")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle folder with a tiny UNet trained for a few seconds on synthetic blobs."""
    bundle = tmp_path_factory.mktemp("tiny_bundle")
    (bundle / "configs").mkdir()
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (bundle / "configs" / "metadata.json").write_text(
        json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "blob"}}}}})
    )
    _train(bundle)
    return bundle


@pytest.fixture(scope="session")
def tiny_target(tiny_bundle):
    from medis3d.bundle import load_bundle

    return load_bundle(tiny_bundle)


@pytest.fixture()
def scan_file(tmp_path) -> Path:
    hu, _ = synthetic_scan(7)
    return save_nifti(tmp_path / "scan.nii.gz", hu)


@pytest.fixture()
def scan_and_label(tmp_path) -> tuple[Path, Path]:
    hu, seg = synthetic_scan(7)
    return save_nifti(tmp_path / "scan.nii.gz", hu), save_nifti(tmp_path / "label.nii.gz", seg)


@pytest.fixture
def overview_kwargs(monkeypatch) -> dict:
    """The keyword arguments of the attack's last ``write_overview`` call (its title, Dice text, ...), filled in as the
    command writes the overview."""
    import medis3d.workflow

    seen: dict = {}
    real = medis3d.workflow.write_overview

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(medis3d.workflow, "write_overview", spy)
    return seen

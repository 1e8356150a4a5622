"""The overview figure and the perturbation histogram: slices where the attack is, PNGs that read back."""

import io
import json

import numpy as np
import pytest

from medis3d.report import choose_slices, render_overview, render_perturbation_histogram, write_overview

SHAPE = (32, 32, 32)


def _structure() -> np.ndarray:
    cube = np.zeros(SHAPE, dtype=bool)
    cube[10:21, 10:21, 10:21] = True  # centre at 15 along each axis
    return cube


def _alternate_planes_delta(seed: int = 0) -> np.ndarray:
    """A perturbation as a model at half the resolution leaves it: zero on every other plane along each axis
    (the kept planes are the odd ones, so the structure's centre plane, 15, is non-zero and 14, 16 are zero)."""
    rng = np.random.default_rng(seed)
    delta = rng.uniform(-8, 8, SHAPE).astype(np.float32)
    delta[0::2] = 0
    delta[:, 0::2] = 0
    delta[:, :, 0::2] = 0
    return delta


def _read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_choose_slices_never_picks_a_zero_plane():
    structure = np.zeros(SHAPE, dtype=bool)
    structure[9:21, 9:21, 9:21] = True  # centre at 14.5: the nearest planes, 14 (zero) and 15, are as near
    delta = _alternate_planes_delta()
    index = choose_slices(delta, structure)
    for axis, i in enumerate(index):
        assert np.any(np.take(delta, i, axis=axis) != 0), (axis, i)
        assert abs(i - 14.5) <= 3, (axis, i)  # still through the structure's middle


def test_choose_slices_even_planes_kept_and_energy_preferred():
    structure = _structure()
    delta = np.zeros(SHAPE, dtype=np.float32)
    delta[:, :, 0::2] = 1.0  # the centre plane 15 along the last axis is zero
    delta[:, :, 16] = 3.0  # and the plane next to it has most energy
    i, j, k = choose_slices(delta, structure)
    assert k == 16
    assert (i, j) == (15, 15)  # every plane is non-zero along the other axes: the centre
    # energy far from the structure does not pull the slice away from it
    delta[:, :, 30] = 100.0
    assert choose_slices(delta, structure)[2] == 16


def test_choose_slices_all_zero_and_no_structure():
    assert choose_slices(np.zeros(SHAPE, np.float32), _structure()) == (15, 15, 15)
    delta = np.zeros((8, 10, 12), np.float32)
    delta[7, 0, 1] = 1.0
    assert choose_slices(delta, None) == (7, 0, 1)  # only those planes are non-zero
    assert choose_slices(np.zeros((8, 10, 12), np.float32)) == (4, 4, 6)  # the volume's centre (3.5 rounds to 4)
    with pytest.raises(ValueError):
        choose_slices(delta, np.zeros((8, 10, 11), bool))


def _synthetic():
    rng = np.random.default_rng(1)
    scan = rng.normal(100, 20, SHAPE).astype(np.float32)
    structure = _structure()
    scan[structure] += 200
    adversarial = scan + _alternate_planes_delta()
    attacked = structure.copy()
    attacked[10:14] = False  # lost
    attacked[21:24, 12:18, 12:18] = True  # gained
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 0] = -1.0  # an LAS file: the panels are reoriented to RAS
    return scan, adversarial, structure, attacked, affine


def test_write_overview_writes_a_png(tmp_path):
    scan, adversarial, clean, attacked, affine = _synthetic()
    path = write_overview(tmp_path / "overview.png", scan, adversarial, clean, attacked, affine, title="case",
                          dice={"blob": 0.412}, reference="clean prediction", units="HU")
    assert path == tmp_path / "overview.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) < 300_000
    image = _read_png(data)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 500 <= image.shape[0] < image.shape[1] <= 1600  # a wide figure at a modest dpi
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]  # no temporary left beside it
    assert len(set(map(tuple, image[..., :3].reshape(-1, 3)[::7]))) > 50  # drawn, not blank


def test_render_overview_shows_lost_and_gained():
    scan, adversarial, clean, attacked, affine = _synthetic()
    same = _read_png(render_overview(scan, adversarial, clean, clean, affine))[..., :3].astype(int)
    changed = _read_png(render_overview(scan, adversarial, clean, attacked, affine))[..., :3].astype(int)
    red = lambda im: (im[..., 0] > 180) & (im[..., 1] < 90) & (im[..., 2] < 90)  # noqa: E731
    cyan = lambda im: (im[..., 0] < 90) & (im[..., 1] > 160) & (im[..., 2] > 180)  # noqa: E731
    # the legend's swatches are there in both; the changed masks add many more such pixels
    assert red(changed).sum() > red(same).sum() + 200
    assert cyan(changed).sum() > cyan(same).sum() + 200


def test_histogram_png_and_all_zero():
    delta = _alternate_planes_delta()
    png = render_perturbation_histogram(delta, units="HU", eps_native=8.0)
    assert png.startswith(b"\x89PNG")
    image = _read_png(png)
    assert image.shape[0] > 100 and image.shape[1] > 200
    empty = render_perturbation_histogram(np.zeros(SHAPE, np.float32))
    assert empty.startswith(b"\x89PNG") and _read_png(empty).shape == image.shape
    assert render_perturbation_histogram(np.zeros(SHAPE, np.float32), eps_native=4.0).startswith(b"\x89PNG")


def test_attack_overview_names_the_chosen_member(tiny_bundle, scan_file, tmp_path, overview_kwargs):
    """The attack's overview named the member chosen by its loss alone: with --members apgd:ce,pgd:ce its title said
    "(ce, 4 steps, ...)", either of the two; it now gives the member as report.json's ``selected.member`` does, as
    evaluate's overview does."""
    from typer.testing import CliRunner

    from medis3d.cli import app

    seen = overview_kwargs
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attack", str(scan_file), "--bundle", str(tiny_bundle), "--members", "apgd:ce,pgd:ce",
                                      "--steps", "2", "--eps", "4/255", "--device", "cpu", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    member = json.loads((out / "report.json").read_text())["selected"]["member"]
    assert f"({member}, " in seen["title"], seen["title"]

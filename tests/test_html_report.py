"""report.html: self-contained pages (figures embedded, nothing fetched), rendered in headless Chromium, where
the figures load, the volume table sorts, a row opens its overview and the console stays free of errors."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_nifti, synthetic_scan

from medis3d.cli import app

runner = CliRunner()
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def study(tiny_bundle, tmp_path_factory) -> Path:
    """A small real study: three volumes with labels, two members, two budgets."""
    root = tmp_path_factory.mktemp("study")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    entries = []
    for i in (1, 2, 3):
        hu, seg = synthetic_scan(30 + i)
        save_nifti(root / "images" / f"case{i}.nii.gz", hu)
        save_nifti(root / "labels" / f"case{i}.nii.gz", seg)
        entries.append({"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"test": entries}))
    out = root / "eval"
    result = runner.invoke(app, ["evaluate", str(root / "dataset.json"), "--out", str(out), "--bundle", str(tiny_bundle),
                                 "--attacks", "igsm", "--losses", "ce,dice", "--eps", "8/255,32/255", "--step", "8/255",
                                 "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _external_references(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']+)""", page)


def test_evaluation_page_is_self_contained_and_complete(study):
    page = (study / "report.html").read_text()
    assert _external_references(page) == []  # every figure embedded: the page opens anywhere, offline
    summary = json.loads((study / "summary.json").read_text())
    for section in ("Dice against the budget", "Members and fusions", "Volumes", "How often each member won", "Settings"):
        assert section in page
    assert page.count("<dialog") == 3 and page.count("data:image/png;base64,") >= 1 + 3  # the curves, an overview per volume
    assert summary["settings"]["command"].startswith("medis3d evaluate ") and "--losses ce,dice" in summary["settings"]["command"]
    assert "reference = the labels" in page
    for v in summary["volumes"]:
        assert v["overview"] and (study / v["overview"]).is_file()
        assert set(v["medis_full"]) == {f"{8 / 255:.6g}", f"{32 / 255:.6g}"}
        assert v["winner"] in ("igsm:ce", "igsm:dice")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _need_browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        if os.environ.get("MEDIS3D_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required but {', '.join(missing)} missing (bash setup.sh installs them)")
        pytest.skip(f"{', '.join(missing)} not installed (bash setup.sh installs them)")


def test_page_in_headless_chromium(study, tmp_path):
    _need_browser()
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get((study / "report.html").resolve().as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 4
        loaded = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert all(loaded), loaded  # every figure decoded, the hidden overviews too
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        def column(index: int) -> list[str]:
            return [row.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-value") or row.find_elements(By.TAG_NAME, "td")[index].text
                    for row in driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")]

        header = driver.find_elements(By.CSS_SELECTOR, "#volumes thead th")
        clean = next(i for i, th in enumerate(header) if th.text == "clean Dice")
        header[clean].click()
        ascending = [float(v) for v in column(clean)]
        assert ascending == sorted(ascending)
        header[clean].click()
        descending = [float(v) for v in column(clean)]
        assert descending == sorted(ascending, reverse=True)
        names = driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")
        header[0].click()  # by name: case1, case2, case3
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")] == \
            ["case1", "case2", "case3"] and len(names) == 3

        row = driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")[1]
        dialog = driver.find_element(By.ID, row.get_attribute("data-dialog"))
        assert not dialog.is_displayed()
        row.click()
        assert dialog.is_displayed() and driver.execute_script("return arguments[0].open", dialog)
        assert "case2" in dialog.text
        overview = dialog.find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].naturalWidth", overview) > 100
        dialog.find_element(By.CSS_SELECTOR, "button.close").click()
        assert not driver.execute_script("return arguments[0].open", dialog)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


def _summary(norm: str = "linf", units: str = "normalized") -> dict:
    """A study's summary from two members' rows on one volume (no model run)."""
    from medis3d.study import fusion_rows, summarise

    eps = 24.0 if units == "native" else 8 / 255
    rows = [{"volume": "v", "eps": eps, "attack": "apgd", "loss": "ce", "member": member, "success": False,
             "clean_dice": 1.0, "linf_normalized": 0.03, "adversarial_mean_iou": iou, "adversarial_dice": dice, "steps": 10,
             "linf_native": 8.0, "l2_native": 100.0, "l2_normalized": 0.25, "time_s": 1.0}
            for member, dice, iou in (("apgd:masked_spherical[then=js]", 0.6, 0.45), ("apgd:ce", 0.7, 0.55))]
    summary = summarise(rows + fusion_rows(rows, None, norm))
    return {**summary, "eps_units": units, "norm": norm, "volumes": []}


def test_report_md_shows_paths_and_names_literally():
    """report.md put a failed volume's error as it came: rendered as Markdown, a label file ``bad<x>|*y*_label.nii.gz``
    showed as ``bad|<em>y</em>_label.nii.gz`` (``<x>`` taken for an HTML tag, ``*y*`` for emphasis). Escaped now, it
    renders as the path; names with underscores between letters stay as they were in the text."""
    from markdown_it import MarkdownIt

    from medis3d.study import markdown_report

    path = "/data/bad<x>|*y*_label.nii.gz"
    summary = {**_summary(), "failed_volumes": [{"volume": "c_d", "error": f"{path}: label shape (30, 30, 30) differs"}]}
    text = markdown_report(summary, 2)
    page = MarkdownIt("commonmark").enable("table").render(text)
    assert f"c_d: {html.escape(path, quote=False)}: label shape" in page
    assert "<td>apgd:masked_spherical[then=js]</td>" in page and "<strong>medis_full</strong>" in page
    assert "| apgd:masked_spherical[then=js] | 8/255 |" in text  # the text itself as readable as before


@pytest.mark.parametrize(("norm", "units", "words"), [
    ("linf", "normalized", "eps = the L-inf budget (each voxel's change), in x/255 of the model's intensity range"),
    ("linf", "native", "eps = the L-inf budget (each voxel's change), in the scan's native units"),
    ("l2", "native", "eps = the L2 budget (the length of the whole perturbation), in the scan's native units"),
])
def test_reports_say_what_eps_is(tmp_path, norm, units, words):
    """Under --eps-units native report.md and report.html wrote a budget as a bare number ("At 24 the attack ...",
    an eps column of 24) and nowhere its units or norm; both now say them once, above every table."""
    from medis3d.html_report import evaluation_page
    from medis3d.study import markdown_report

    summary = _summary(norm, units)
    assert words in markdown_report(summary, 1, units).splitlines()[2]
    assert html.escape(words, quote=True) in evaluation_page(summary, tmp_path)


def test_attack_page_states_the_budget():
    """An attack's report.html gave the size of the perturbation written (L-inf 3.82/255) but nowhere the budget it was
    allowed (--eps 4/255, 6.275 native units on a 400-unit window), except as 0.0156863 inside the settings' JSON."""
    from medis3d.html_report import attack_page

    scores = {"dice": {"blob": 0.9}, "mean_iou": 0.83}
    report = {"input": {"path": "/data/a&b.nii.gz"}, "success": False, "clean": {"dice": {"blob": 0.92}, "mean_iou": 0.86},
              "adversarial": scores, "selected": {"member": "pgd:ce", "steps": 6}, "members": [],
              "perturbation": {"linf_normalized": 0.015, "linf_native": 6.0, "l2_normalized": 3.1, "l2_native": 1241.0},
              "attack": {"targeted": False, "reference": "label file", "norm": "linf", "success_threshold": 0.5,
                         "eps": 4 / 255, "eps_units": "normalized", "eps_native": 6.27451, "steps": 6}}
    page = attack_page(report, None)
    assert "Budget: L-inf eps 4/255 (6.275 native units), 6 iteration(s) per member." in page
    assert "<h1>medis3d attack: a&amp;b.nii.gz</h1>" in page
    native = {**report, "attack": {**report["attack"], "norm": "l2", "eps": 2000.0, "eps_units": "native", "eps_native": 2000.0}}
    assert "Budget: L2 eps 2000 native units, 6 iteration(s) per member." in attack_page(native, None)


def test_traces_say_what_the_score_is_and_large_budgets_print_whole(monkeypatch):
    """The traces' y-axis said "score (mean IoU)" for a targeted attack too, whose score is the smoothed mean IoU with
    the target; and a normalized budget of 1000/255 or more (an L2 one) printed as 1.02e+03/255."""
    import medis3d.html_report as page

    figures = []
    real = page.new_figure

    def keep(*args, **kwargs):
        figures.append(real(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(page, "new_figure", keep)
    members = [{"member": "apgd:ce", "trace": [{"step": 0, "score": 0.9}, {"step": 1, "score": 0.4}]}]
    page.traces_plot(members, 0.5, targeted=True)
    page.traces_plot(members, 0.5)
    assert [f.axes[0].get_ylabel() for f in figures] == ["score (smoothed mean IoU with the target)",
                                                         "score (mean IoU with the reference)"]
    assert page.eps_label(4.0) == "1020/255" and page.eps_label(8 / 255) == "8/255" and page.eps_label(2.5 / 255) == "2.5/255"
    assert page.eps_label(2000.0, "native") == "2000"

"""Pages a person reads: one self-contained ``report.html`` per study (``evaluate``) and per attack, with
every figure embedded (no network access needed to open it), and the results said in words.

The evaluation page shows Dice and success rate against the budget (one curve per member, the fusions
in bold), a sortable table with a line per volume whose rows open that volume's overview, how often
each member won, the gradient-masking verdicts, the transfer matrix when there are victims, and every
setting with the command line that repeats the study. The attack page shows the verdict, the overview,
the members' score against step, a histogram of the perturbation, and the settings."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medis3d.report import figure_png, new_figure

FUSIONS = ("medis_full", "worst_case")
RISE_TOLERANCE = 0.02  # Dice a member may gain with more budget before it is said to have stopped short

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#1d1d1f}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.verdict{font-size:1.1em;padding:.8em 1em;border-radius:6px;background:#f3f6fb;border-left:4px solid #3a6ea5}
.verdict.bad{background:#fdf1f1;border-left-color:#b33a3a}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f5f5f7;cursor:pointer;user-select:none}td:first-child,th:first-child{text-align:left}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.text{text-align:left}tr.volume{cursor:pointer}tr.volume:hover{background:#eef4ff}
img.figure{max-width:100%;height:auto;border:1px solid #eee}
dialog{max-width:95vw;max-height:95vh;overflow:auto;border:1px solid #999;border-radius:6px}dialog img{max-width:100%}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}code{background:#f2f2f2;padding:.1em .3em}
.muted{color:#666;font-size:.9em}
"""

_SCRIPT = """
(function(){
  function value(cell){var v=cell.getAttribute('data-value');if(v===null)v=cell.textContent;
    var n=parseFloat(v);return (v!==''&&!isNaN(n)&&isFinite(n))?n:v.toLowerCase();}
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads=table.querySelectorAll('thead th');
    heads.forEach(function(th,index){th.addEventListener('click',function(){
      var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
      var asc=!th.classList.contains('sorted-asc');
      heads.forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(asc?'sorted-asc':'sorted-desc');
      rows.sort(function(a,b){var x=value(a.cells[index]),y=value(b.cells[index]);
        if(typeof x!==typeof y){x=String(x);y=String(y);}
        return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});});});});
  document.querySelectorAll('tr.volume').forEach(function(row){
    function open(){var d=document.getElementById(row.getAttribute('data-dialog'));if(d)d.showModal();}
    row.addEventListener('click',open);
    row.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();open();}});});
  document.querySelectorAll('dialog button.close').forEach(function(b){
    b.addEventListener('click',function(){b.closest('dialog').close();});});
})();
"""


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, for an ``<img>`` that needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if v != v else f"{v:.{digits}f}"


def eps_label(eps: Any, units: str = "normalized") -> str:
    """A budget as people write it: ``8/255`` of the intensity range, or native units as given."""
    v = float(eps)
    if units != "normalized":
        return f"{v:.4g}"
    x = v * 255  # whole numbers from 1000 on (an L2 budget): 3 digits printed 4/255... as 1.02e+03/255
    return (f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}") + "/255"


def budget_words(units: str = "normalized", norm: str = "linf") -> str:
    """What a study's eps means, in words: its norm and its units (every eps in its tables is in these)."""
    if norm == "l2":
        kind = "eps = the L2 budget (the length of the whole perturbation)"
        return kind + (", in the scan's native units" if units != "normalized" else
                       ", on the scan scaled to the model's intensity range, written x/255")
    return "eps = the L-inf budget (each voxel's change)" + (", in the scan's native units" if units != "normalized"
                                                               else ", in x/255 of the model's intensity range")


def size_label(norm: str, size: Mapping[str, Any], short: bool = False) -> str:
    """A perturbation's size (``size``: its ``linf_normalized``, ``linf_native``, ``l2_normalized``, ``l2_native``) in
    the budget's norm first: ``L-inf 8.00/255 (2.47 native units)``, or under an L2 budget ``L2 1000 native units
    (0.52 normalised), L-inf ...``; ``short``: the budget's norm alone."""
    linf = f"L-inf {size['linf_normalized'] * 255:.2f}/255 ({size['linf_native']:.4g} native units)"
    if norm != "l2":
        return linf
    l2 = f"L2 {size['l2_native']:.4g} native units ({size['l2_normalized']:.3g} normalised)"
    return l2 if short else f"{l2}, {linf}"


def eps50_label(model: dict, budgets: Sequence[float]) -> str:
    """A model's eps50 as the comparison tables write it, with the two measured budgets it was interpolated between
    (``41.4/255 (between 32/255 and 64/255)``: the farther apart, the rougher the figure), or ``above`` the largest
    budget where the Dice stays above half."""
    e50 = model.get("eps50")
    if not e50:
        return f"above {eps_label(max(budgets))}" if budgets else "-"
    between = model.get("eps50_between")
    if not between:
        return eps_label(e50)
    low, high = between
    return f"{eps_label(e50)} (between {eps_label(low) if low else 'the clean scan'} and {eps_label(high)})"


def dice_curves(summary: dict, units: str = "normalized") -> bytes:
    """Mean Dice under attack and success rate against eps: one thin curve per member, the full fusion and the
    worst case in bold; the number of volumes in the title. PNG bytes."""
    fig = new_figure((11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    volumes = 0
    scale = 255 if units == "normalized" else 1
    for group in ("per_member", "fusion"):
        for key, by_eps in summary.get(group, {}).items():
            eps = sorted(by_eps, key=float)
            bold = key in FUSIONS
            style: dict[str, Any] = dict(lw=3, zorder=3) if bold else dict(lw=1, alpha=0.55)
            if group == "fusion" and not bold:
                style = dict(lw=1.5, ls="--", alpha=0.8)
            xs = [float(e) * scale for e in eps]
            ax.plot(xs, [by_eps[e]["mean_robust_dice"] for e in eps], marker="o", label=key, **style)
            ax2.plot(xs, [by_eps[e]["attack_success_rate"] for e in eps], marker="o", label=key, **style)
            volumes = max(volumes, max((by_eps[e].get("volumes", 0) for e in eps), default=0))
    xlabel = "eps (x/255 of the intensity range)" if units == "normalized" else "eps (native units)"
    for a, ylabel in ((ax, "mean Dice under attack"), (ax2, "attack success rate")):
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Robustness over {volumes} volume(s)", fontsize=11)
    return figure_png(fig)


def score_label(targeted: bool = False) -> str:
    """What a member's score is: mean IoU with the reference, or (targeted) the smoothed mean IoU with the target."""
    return "score (smoothed mean IoU with the target)" if targeted else "score (mean IoU with the reference)"


def traces_plot(members: Sequence[dict], threshold: float | None = None, targeted: bool = False) -> bytes:
    """Each member's score (mean IoU against the reference, or the target) against step, the success threshold
    dashed. PNG bytes."""
    fig = new_figure((7.5, 4))
    ax = fig.subplots()
    for m in members:
        trace = [r for r in m.get("trace", []) if r.get("score") is not None]
        if trace:
            ax.plot([r["step"] for r in trace], [r["score"] for r in trace], marker=".", lw=1.5, label=m["member"])
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"success threshold {threshold:g}")
    ax.set_xlabel("step")
    ax.set_ylabel(score_label(targeted))  # a targeted attack's score was labelled mean IoU
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png(fig)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n"
            f"<script>{_SCRIPT}</script></body></html>\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], sortable: bool = False, row_attrs: Sequence[str] = (),
           table_id: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    lines = []
    for i, cells in enumerate(rows):
        attrs = row_attrs[i] if i < len(row_attrs) else ""
        lines.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    cls = " class=\"sortable\"" if sortable else ""
    ident = f" id=\"{_e(table_id)}\"" if table_id else ""
    return f"<table{ident}{cls}><thead><tr>{head}</tr></thead><tbody>" + "".join(lines) + "</tbody></table>"


def _cell(text: Any, value: Any = None) -> str:
    """A table cell; ``value`` (a number) is what it sorts by, and a cell without one is text (left-aligned)."""
    attr = " class=\"text\"" if value is None else f" data-value=\"{_e(value)}\""
    return f"<td{attr}>{_e(text)}</td>"


def reference_words(summary: dict) -> str:
    """What a study's Dice is measured against, in words: the labels, or the model's clean prediction."""
    references = {v.get("reference") for v in summary.get("volumes", [])}
    if references == {"label"}:
        return "reference = the labels"
    if references == {"clean prediction"}:
        return "reference = the model's clean prediction (clean Dice is 1.000 by definition)"
    return "reference = the label where given, else the model's clean prediction"


# what the sizes MedIS fusion compared in a study were (summary.json's ``medis_sizes``)
SIZES_WORDS = {"first_success": "the sizes of the members' first successes",
               "strongest_iterate": "the sizes of the members' strongest iterates, not of their first successes"}


def medis_sizes(summary: dict) -> str:
    """Which sizes a study's MedIS fusion compared (a key of :data:`SIZES_WORDS`): its members' first successes where
    they stopped there (--stop-at-success), else their strongest iterates; a summary's own ``medis_sizes`` first."""
    return summary.get("medis_sizes") or ("first_success" if summary.get("stop_at_success") else "strongest_iterate")


def stopping_words(summary: dict) -> str:
    """How the members ran, in words: every iteration (the lowest Dice each reached), or until their first success."""
    if summary.get("stop_at_success"):
        return ("members stopped at their first success (--stop-at-success): Dice where a member succeeded is where it "
                "stopped, not the lowest it reaches")
    return ("every member ran all its iterations: its Dice is the lowest it reached in the budget, and MedIS fusion "
            "(medis_*) chose among the successful by the size of that strongest iterate, not where each first succeeded "
            "as attack's does (--stop-at-success for that)")


def study_verdict(summary: dict, units: str = "normalized") -> tuple[str, str]:
    """The study in one sentence (and its tone: "bad" where every volume broke, else plain): what the full fusion did at the largest
    budget, on how many volumes, and the Dice it left."""
    fusion = summary.get("fusion", {}).get("medis_full") or summary.get("fusion", {}).get("worst_case")
    if not fusion:
        return "No fused result: no member ran.", ""
    largest = max(fusion, key=float)
    e = fusion[largest]
    n = e.get("volumes", 0)
    broken = round(e["attack_success_rate"] * n)
    reference = reference_words(summary)
    worst = summary.get("fusion", {}).get("worst_case", {}).get(largest, {})
    text = (f"At {eps_label(largest, units)} the attack succeeded on {broken} of {n} volume(s): mean Dice "
            f"{number(e['mean_clean_dice'])} clean, {number(e['mean_robust_dice'])} under MedIS fusion"
            + (f", {number(worst['mean_robust_dice'])} in the per-volume worst case" if worst else "") + f"; {reference}; "
            f"{stopping_words(summary)}.")
    if broken < n:
        text += (" Not successful on every volume at this budget: try larger --eps, more --steps, --restarts 3 (APGD "
                 "members) or --preset reliable before reading this as robustness.")
        return text, ""
    return text, "bad"


def evaluation_page(summary: dict, out: Path) -> str:
    """``report.html`` of an ``evaluate`` study from its summary (and the per-volume overviews under ``out``)."""
    settings = summary.get("settings") or {}
    units = summary.get("eps_units") or (settings.get("options") or {}).get("eps_units", "normalized")
    volumes = summary.get("volumes", [])
    parts = [f"<h1>medis3d robustness study</h1><p class=\"muted\">{len(volumes)} volume(s)"
             + (f"; model {_e(summary['transfer']['source'])}" if summary.get("transfer") else "")
             + (f"; medis3d {_e(settings['medis3d'])}" if settings.get("medis3d") else "")
             + f"; {_e(budget_words(units, summary.get('norm', 'linf')))}</p>"]
    text, tone = study_verdict(summary, units)
    parts.append(f"<p class=\"verdict {tone}\" id=\"verdict\">{_e(text)}</p>")
    failed = summary.get("failed_volumes") or []
    if failed:
        parts.append(f"<p class=\"verdict bad\" id=\"failed\">{len(failed)} volume(s) not evaluated (no figure here includes "
                     "them): " + "; ".join(f"{_e(f['volume'])}: {_e(f['error'])}" for f in failed) + "</p>")
    curves = out / "robustness.png"  # evaluate's plot of the same (drawn here when there is none)
    curves_png = curves.read_bytes() if curves.is_file() else dice_curves(summary, units)
    parts.append("<h2>Dice against the budget</h2>"
                 f"<img class=\"figure\" id=\"dice-curves\" alt=\"Dice and success rate against eps\" src=\"{data_uri(curves_png)}\">")
    parts.append(_fusion_table(summary, units))
    if summary.get("rises_with_budget"):
        rows = [[_cell(r["volume"]), _cell(r["member"]), _cell(eps_label(r["smaller_eps"], units), float(r["smaller_eps"])),
                 _cell(number(r["smaller_dice"]), r["smaller_dice"]), _cell(eps_label(r["eps"], units), float(r["eps"])),
                 _cell(number(r["dice"]), r["dice"])] for r in summary["rises_with_budget"]]
        parts.append(f"<h2>Dice that rose with the budget</h2><p class=\"verdict bad\" id=\"rises-warning\">{_e(rise_words(summary['rises_with_budget']))}.</p>"
                     + _table(["volume", "member", "smaller eps", "Dice", "larger eps", "Dice"], rows, sortable=True))
    parts.append(_volume_table(volumes, out, units))
    if summary.get("loss_wins"):
        wins = sorted(summary["loss_wins"].items(), key=lambda kv: -kv[1])
        parts.append("<h2>How often each member won</h2><p class=\"muted\">The member MedIS fusion chose (least perturbation "
                     "among the successful, else the strongest; " + _e(SIZES_WORDS[medis_sizes(summary)]) + "), counted over volumes and budgets.</p>"
                     + _table(["member", "chosen"], [[_cell(k), _cell(v)] for k, v in wins], sortable=True))
    if summary.get("diagnose"):
        rows = [[_cell(name), _cell("flagged" if d["flagged"] else "no sign of gradient masking"), _cell(", ".join(d["flags"]) or "-")]
                for name, d in summary["diagnose"].items()]
        parts.append("<h2>Gradient-masking checks</h2>" + _table(["volume", "verdict", "flags"], rows))
    if summary.get("transfer"):
        parts.append(_transfer_table(summary["transfer"], units))
    if summary.get("greedy_dataset_dice"):
        rows = [[_cell(eps_label(e, units), float(e)), _cell(number(v), v)] for e, v in sorted(summary["greedy_dataset_dice"].items(), key=lambda kv: float(kv[0]))]
        parts.append("<h2>Dataset-level worst case</h2><p class=\"muted\">SEA's greedy choice of one member per volume that "
                     "minimises the Dice pooled over all volumes.</p>" + _table(["eps", "pooled Dice"], rows))
    parts.append(_settings_block(settings))
    return _page("medis3d robustness study", "\n".join(parts))


def rise_words(rises: list[dict]) -> str:
    """One sentence on the members whose Dice rose with the budget (:func:`rises_with_budget`)."""
    return (f"{len(rises)} member outcome(s) left a higher Dice at a larger budget than at a smaller one (by more than "
            f"{RISE_TOLERANCE}): those attacks stopped short at the larger budget (run them longer: --steps, --restarts); "
            "the worst case takes the smaller budget's adversarial, which lies inside the larger ball")


def distortion(summary: dict, entry: dict) -> tuple[str, str, float | None]:
    """A study's mean distortion of the successful in its budget's norm: the column's title, the cell's text and value."""
    if summary.get("norm") == "l2":
        dist = entry.get("mean_distortion_l2_native")
        return "mean L2 of the successful (native units)", "-" if dist is None else f"{dist:.4g}", dist
    dist = entry.get("mean_distortion_linf_normalized")
    return "mean L-inf of the successful", "-" if dist is None else eps_label(dist), dist


def _fusion_table(summary: dict, units: str) -> str:
    rows = []
    title = distortion(summary, {})[0]
    for group in ("fusion", "per_member"):
        for key, by_eps in summary.get(group, {}).items():
            for eps in sorted(by_eps, key=float):
                e = by_eps[eps]
                _, text, dist = distortion(summary, e)
                rows.append([_cell(key), _cell(eps_label(eps, units), float(eps)), _cell(number(e["mean_clean_dice"]), e["mean_clean_dice"]),
                             _cell(number(e["mean_robust_dice"]), e["mean_robust_dice"]),
                             _cell(number(e["attack_success_rate"], 2), e["attack_success_rate"]),
                             _cell(text, dist), _cell(e.get("volumes", ""))])
    return ("<h2>Members and fusions</h2>" + _table(["attack", "eps", "mean clean Dice", "mean Dice under attack", "success rate",
                                                     title, "volumes"], rows, sortable=True, table_id="members"))


def _volume_table(volumes: Sequence[dict], out: Path, units: str) -> str:
    budgets = sorted({e for v in volumes for e in v.get("medis_full", {})}, key=float)
    headers = ["volume", "clean Dice"] + [f"Dice at {eps_label(e, units)}" for e in budgets] + [
        "worst case at largest eps", "smallest successful eps", "winning member", "time (s)"]
    rows, attrs, dialogs = [], [], []
    for i, v in enumerate(volumes):
        largest = budgets[-1] if budgets else None
        worst = v.get("worst_case", {}).get(largest) if largest else None
        smallest = v.get("smallest_successful_eps")
        cells = [_cell(v["volume"]), _cell(number(v["clean_dice"]), v["clean_dice"])]
        cells += [_cell(number(v["medis_full"].get(e)), v["medis_full"].get(e)) for e in budgets]
        cells += [_cell(number(worst), worst), _cell("none" if smallest is None else eps_label(smallest, units),
                                                   "" if smallest is None else smallest),
                  _cell(v.get("winner") or "-"), _cell(f"{v.get('time_s', 0):.0f}", v.get("time_s", 0))]
        rows.append(cells)
        dialog = f"overview-{i}"
        attrs.append(f" class=\"volume\" tabindex=\"0\" data-dialog=\"{dialog}\" data-volume=\"{_e(v['volume'])}\"")
        overview = out / v["overview"] if v.get("overview") else None
        if overview is not None and overview.is_file():
            image = f"<img alt=\"overview of {_e(v['volume'])}\" src=\"{data_uri(overview.read_bytes())}\">"
        else:
            image = "<p>No overview: the member chosen at the largest budget was cached by an earlier run.</p>"
        dialogs.append(f"<dialog id=\"{dialog}\"><button class=\"close\" type=\"button\">close</button>"
                       f"<h3>{_e(v['volume'])}</h3><p class=\"muted\">reference = {_e(v.get('reference', 'clean prediction'))}; "
                       f"the member MedIS fusion chose at the largest budget: scan, adversarial, perturbation, predictions.</p>"
                       f"{image}</dialog>")
    return ("<h2>Volumes</h2><p class=\"muted\">Dice under MedIS fusion per budget. Click a column to sort, a row to see "
            "that volume's overview.</p>" + _table(headers, rows, sortable=True, row_attrs=attrs, table_id="volumes") + "".join(dialogs))


def _transfer_table(transfer: dict, units: str) -> str:
    models = transfer["models"]
    rows = [[_cell("clean"), _cell("0", 0)] + [_cell(number(transfer["clean"].get(m)), transfer["clean"].get(m)) for m in models]]
    for eps in sorted(transfer["by_eps"], key=float):
        for fusion, entry in transfer["by_eps"][eps].items():
            rows.append([_cell(fusion), _cell(eps_label(eps, units), float(eps))] + [_cell(number(entry.get(m)), entry.get(m)) for m in models])
    return (f"<h2>Transfer: adversarials made on {_e(transfer['source'])}</h2><p class=\"muted\">Mean Dice of each model on the "
            "adversarials the attack made on the source (first column): the black-box threat, where the attacker does not "
            "have the victim's weights.</p>" + _table(["adversarial", "eps"] + list(models), rows, sortable=True, table_id="transfer"))


def _settings_block(settings: dict) -> str:
    if not settings:
        return ""
    command = settings.get("command")
    return ("<h2>Settings</h2>" + (f"<p>Repeat with: <code id=\"command\">{_e(command)}</code></p>" if command else "")
            + f"<pre id=\"settings\">{_e(json.dumps(settings, indent=2, default=str))}</pre>")


def verdict(report: Mapping[str, Any]) -> str:
    """What the attack did, in words: success or not against its threshold, the reference, and what to try next."""
    attack, sel = report["attack"], report["selected"]
    targeted = attack["targeted"]
    # the written file's score, which decided success
    score = (report["adversarial"]["against_target"] if targeted else report["adversarial"])["mean_iou"]
    metric = "mean IoU with the target" if targeted else "mean IoU"
    relation = (">=" if report["success"] else "<") if targeted else ("<=" if report["success"] else ">")
    reference = ("the label file" if attack["reference"] == "label file" else "the model's clean prediction")
    budget = size_label(attack.get("norm", "linf"), report["perturbation"])
    measured = f"{metric} {score:.3f} {relation} {attack['success_threshold']:g}; reference = {reference}"
    if report["success"]:
        return f"Attack succeeded ({measured}): member {sel['member']} after {sel['steps']} step(s), {budget}."
    return (f"Attack not successful at this budget ({measured}); the strongest member, {sel['member']}, used {budget}. "
            "Try a larger --eps, more --steps, --restarts 3 (APGD members), or --preset reliable.")


def budget_line(attack: Mapping[str, Any]) -> str:
    """An attack's budget in words, as given and in the scan's native units, and the iterations each member had."""
    units, eps_native = attack.get("eps_units", "normalized"), attack.get("eps_native")
    given = eps_label(attack["eps"], units) + (" native units" if units != "normalized" else "")
    native = f" ({eps_native:.4g} native units)" if units == "normalized" and eps_native is not None else ""
    return (f"Budget: {'L2' if attack.get('norm') == 'l2' else 'L-inf'} eps {given}{native}, "
            f"{attack.get('steps')} iteration(s) per member.")


def attack_page(report: Mapping[str, Any], overview_png: bytes | None, histogram_png: bytes | None = None) -> str:
    """``report.html`` of one ``medis3d attack``: the verdict, Dice clean and attacked, the overview, the members'
    traces, the perturbation's histogram and the settings (the report itself, as JSON)."""
    name = Path(report["input"]["path"]).name if report.get("input", {}).get("path") else "scan"
    parts = [f"<h1>medis3d attack: {_e(name)}</h1>",
             f"<p class=\"verdict {'bad' if report['success'] else ''}\" id=\"verdict\">{_e(verdict(report))}</p>"]
    clean, adv = report["clean"], report["adversarial"]
    rows = [[_cell(k), _cell(number(clean["dice"][k]), clean["dice"][k]), _cell(number(adv["dice"].get(k)), adv["dice"].get(k))]
            for k in clean["dice"]]
    rows.append([_cell("mean IoU"), _cell(number(clean["mean_iou"]), clean["mean_iou"]), _cell(number(adv["mean_iou"]), adv["mean_iou"])])
    reference = "the label file" if report["attack"]["reference"] == "label file" else "the model's clean prediction (clean Dice is 1.000 by definition)"
    parts.append(f"<h2>Segmentation, clean and attacked</h2><p class=\"muted\">reference = {_e(reference)}</p>"
                 + _table(["class", "clean Dice", "Dice under attack"], rows))
    if overview_png:
        parts.append("<h2>Overview</h2>"
                     f"<img class=\"figure\" id=\"overview\" alt=\"overview\" src=\"{data_uri(overview_png)}\">")
    members = report.get("members", [])
    l2 = report["attack"].get("norm") == "l2"
    # members that shared passes (--together): each one's wall span holds the others' share of those passes, so the
    # spans overlap; the table shows each one's share (they add up) and its span beside it
    shared = bool((report["attack"].get("together") or {}).get("passes"))

    def times(m) -> list[str]:
        share = m.get("time_share_s", m["time_s"])
        return [_cell(f"{share:.1f}", share)] + ([_cell(f"{m['time_s']:.1f}", m["time_s"])] if shared else [])

    member_rows = [[_cell(m["member"]), _cell("yes" if m["success"] else "no"), _cell(m["steps"]),
                    _cell(f"{m['l2_native']:.4g}", m["l2_native"]) if l2 else _cell(eps_label(m["linf_normalized"]), m["linf_normalized"]),
                    _cell(number(m["mean_iou"] if m["mean_iou"] is not None else m["target_mean_iou"])), *times(m)]
                   for m in members]
    size = "L2 (native units)" if l2 else "L-inf"
    time_columns = ["time (s), its share of the shared passes", "wall span (s), overlapping"] if shared else ["time (s)"]
    parts.append("<h2>Members</h2>" + f"<p class=\"muted\" id=\"budget\">{_e(budget_line(report['attack']))}</p>"
                 + _table(["member", "success", "steps", size, "score", *time_columns], member_rows, sortable=True))
    if any(m.get("trace") for m in members):
        parts.append("<img class=\"figure\" id=\"traces\" alt=\"score against step, per member\" "
                     f"src=\"{data_uri(traces_plot(members, report['attack'].get('success_threshold'), bool(report['attack'].get('targeted'))))}\">")
    if histogram_png:
        parts.append("<h2>Perturbation</h2>"
                     f"<img class=\"figure\" id=\"histogram\" alt=\"histogram of the perturbation\" src=\"{data_uri(histogram_png)}\">")
    settings = {k: report.get(k) for k in ("input", "target", "attack", "perturbation", "outputs")}
    parts.append(_settings_block(settings))
    return _page(f"medis3d attack: {name}", "\n".join(parts))


def harden_verdict(comparison: dict) -> tuple[str, str]:
    """The comparison of ``harden`` in words, and the verdict's class (``bad`` where hardening did not help)."""
    models = comparison.get("models", {})
    source, hardened = models.get("source"), models.get("hardened")
    if not source or not hardened or not source.get("curve") or not hardened.get("curve"):
        return "No comparison was made.", ""
    eps, dice_hardened = max(hardened["curve"])
    dice_source = dict(source["curve"]).get(eps)
    text = (f"At {eps_label(eps)} the hardened model keeps a mean Dice of {number(dice_hardened)} under the worst case over "
            f"{len(comparison.get('members', []))} attack member(s), against {number(dice_source)} for the source; clean Dice "
            f"{number(hardened['clean_dice'])} against {number(source['clean_dice'])}.")
    helped = dice_source is not None and dice_hardened > dice_source
    if not helped:
        text += " Hardening did not make it more robust at this budget."
    return text, "" if helped else "bad"


def harden_page(comparison: dict, plot_png: bytes, recipe: dict, settings: dict, source: str,
                studies: Sequence[str] = ("../evaluation/source/report.html", "../evaluation/hardened/report.html")) -> str:
    """``docs/report.html`` of a hardened bundle: the verdict, Dice under attack against eps for both models, the
    before/after table with eps50, the recipe, links to both studies' pages, and every setting."""
    text, cls = harden_verdict(comparison)
    models = comparison.get("models", {})
    budgets = sorted({e for m in models.values() for e, _ in m.get("curve", [])})
    rows = []
    for role in ("source", "hardened"):
        m = models.get(role)
        if not m:
            continue
        by_eps = dict(m.get("curve", []))
        rows.append([_cell(role), _cell(number(m.get("clean_dice")), m.get("clean_dice"))]
                    + [_cell(number(by_eps.get(e)), by_eps.get(e)) for e in budgets]
                    + [_cell(eps50_label(m, budgets), m.get("eps50") or "")])
    table = _table(["model", "clean Dice"] + [f"Dice at {eps_label(e)}" for e in budgets] + ["eps50"], rows, table_id="comparison")
    recipe_items = "".join(f"<li><b>{_e(k.replace('_', ' '))}</b>: {_e(v if not isinstance(v, list) else ', '.join(map(str, v)) or '-')}</li>"
                           for k, v in recipe.items())
    links = " and ".join(f"<a href=\"{_e(link)}\">{_e(role)}</a>" for role, link in zip(("source", "hardened"), studies))
    lows = [(float(key), v) for key, vs in ((models.get("hardened") or {}).get("transfer_lower") or {}).items() for v in vs]
    warning = ("<p class=\"verdict bad\" id=\"transfer-warning\">The source's adversarials (transfer) left the hardened model "
               "lower than its own white-box attacks: "
               + "; ".join(f"{_e(v['volume'])} at {_e(eps_label(e))}: {v['transfer_dice']:.4f} against {v['white_box_dice']:.4f}"
                           for e, v in sorted(lows, key=lambda ev: ev[0]))
               + ". A sign of gradient masking (<code>medis3d diagnose</code> checks for it); the table takes the lower.</p>") if lows else ""
    body = (f"<h1>{_e(source)}: robustness before and after hardening</h1>"
            f"<p class=\"verdict {cls}\" id=\"verdict\">{_e(text)}</p>"
            f"<img class=\"figure\" alt=\"Dice against eps, both models\" src=\"{data_uri(plot_png)}\">"
            f"<h2>Before and after</h2>{table}{warning}"
            "<p class=\"muted\">Dice against the labels of the validation volumes, the per-volume worst case over the members "
            f"({_e(', '.join(comparison.get('members', [])))}; {_e(comparison.get('steps'))} iterations each; the hardened "
            "model's also over the source's adversarials scored on it, transfer: the lower of the two). eps50: the budget "
            "at which the mean Dice falls to half the clean Dice, interpolated between the two budgets measured that it names: "
            "where they lie far apart, measure the budgets between them for a closer figure.</p>"
            f"<p>Each model's full study: {links}.</p>"
            f"<h2>Recipe</h2><ul>{recipe_items}</ul>"
            + _settings_block(settings))
    return _page(f"{source}: hardening", body)

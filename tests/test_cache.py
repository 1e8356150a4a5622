"""The outcome store shared by evaluate and the strength benchmark: only what it lacks runs, all of it at once."""

import json

from medis3d.cache import OutcomeCache, cached_outcomes


def test_only_the_missing_members_run_together_and_are_kept_as_read_back(tmp_path):
    store = OutcomeCache(tmp_path / "cache")
    calls: list[list[str]] = []

    def run(members):
        calls.append(list(members))
        return [{"dice": 0.5, "name": m} for m in members]

    def keep(member, outcome):
        return store.put({"member": member}, outcome, where="case", label=member.replace(":", "_"), tail="0.0314")

    def lookup(member):
        return store.get({"member": member}, where="case", label=member.replace(":", "_"), tail="0.0314")

    first = cached_outcomes(["apgd:ce", "pgd:ce", "pgd:dice"], str, lookup, run, keep)
    assert calls == [["apgd:ce", "pgd:ce", "pgd:dice"]] and first["pgd:ce"]["dice"] == 0.5
    path = store.path({"member": "pgd:ce"}, where="case", label="pgd_ce", tail="0.0314")
    assert path.parent.name == "case" and path.name.startswith("pgd_ce_") and path.name.endswith("_0.0314.json")
    assert json.loads(path.read_text())["name"] == "pgd:ce"
    path.unlink()  # one outcome lost: only that member runs again, the others are read back
    again = cached_outcomes(["apgd:ce", "pgd:ce", "pgd:dice"], str, lookup, run, keep)
    assert calls[1:] == [["pgd:ce"]] and again == first
    # a lookup that refuses what the store holds (another stopping rule, a victim missing) runs the member anew
    cached_outcomes(["apgd:ce"], str, lambda m: None, run, keep)
    assert calls[2:] == [["apgd:ce"]]
    # the key decides: another setting is another file
    assert store.path({"member": "pgd:ce", "steps": 4}) != store.path({"member": "pgd:ce", "steps": 2})
    assert not list((tmp_path / "cache").rglob("*.tmp"))

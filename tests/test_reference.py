"""The README's run-file reference and ds_configs/README.md are generated from the code."""
from __future__ import annotations

import shutil

import pytest

from launcher import reference
from launcher.config import runfile


def test_readme_reference_is_up_to_date():
    assert reference.stale() == [], \
        f"the generated tables are out of date: run `{reference.COMMAND}` and commit the result"


def test_the_table_has_one_row_per_field():
    rows = reference.fields_table().splitlines()[2:]
    keys = [k for k, _, _, _ in runfile.fields_reference()]
    assert [r.split("`")[1] for r in rows] == keys
    row = next(r for r in rows if r.startswith("| `cluster.time` |"))
    assert row == ("| `cluster.time` | a string | `24:00:00` | Time limit (`--time`, e.g. 24:00:00 "
                   "or 2-00:00:00); auto: the plan's time estimate with a margin (load, "
                   "preflight, checkpoints, export), capped at the partition's MaxTime "
                   "(docs/time.md); `partition-default`: no --time, the partition's DefaultTime "
                   "(else its MaxTime) applies, read by --submit from `scontrol show partition`. |")
    assert "| `model.path` | a string | **required** |" in reference.fields_table()


def test_check_fails_on_a_stale_copy_and_the_update_fixes_it(tmp_path, monkeypatch, capsys):
    for name, src in (("README.md", reference.README), ("DS.md", reference.DS_README)):
        shutil.copy(src, tmp_path / name)
    readme, ds_readme = str(tmp_path / "README.md"), str(tmp_path / "DS.md")
    markers = {readme: reference.MARKERS[reference.README],
               ds_readme: reference.MARKERS[reference.DS_README]}
    monkeypatch.setattr(reference, "README", readme)
    monkeypatch.setattr(reference, "DS_README", ds_readme)
    monkeypatch.setattr(reference, "MARKERS", markers)
    text = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text(text.replace("| `name` |", "| `old_name` |"))
    assert reference.main(["--check"]) == 1
    assert f"out of date: run `{reference.COMMAND}`" in capsys.readouterr().err
    assert reference.main([]) == 0
    assert reference.main(["--check"]) == 0
    assert (tmp_path / "README.md").read_text() == text


def test_render_needs_the_markers():
    with pytest.raises(ValueError, match="lacks the markers"):
        reference.render(reference.README, "no markers here")


def test_defaults_are_rendered_as_yaml_values():
    assert reference.default_text(None) == "`null`"
    assert reference.default_text(True) == "`true`"
    assert reference.default_text(["lm_head"]) == '`["lm_head"]`'
    assert reference.default_text("(required)") == "**required**"

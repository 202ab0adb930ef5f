"""Validate's rules for preference objectives (train.objective dpo, ipo, simpo, orpo): what
the pairs need from the data section and which reference each objective can use. Registered
with launcher/checks/rules.py (imported by launcher/checks/validate.py); torch-free."""
from __future__ import annotations

from typing import Iterator

from launcher.config.schema import RunConfig
from launcher.config.errors import Problem
from launcher.checks.rules import input_rule, rule

REFERENCE_FREE = ("simpo", "orpo")


@rule
def _preference_data(cfg: RunConfig) -> Iterator[Problem]:
    d, obj = cfg.data, cfg.train.objective
    if obj == "sft":
        return
    if d.packing:
        yield Problem("data.packing", f"train.objective {obj} compares a chosen and a rejected "
                      "sequence of each pair, which packing would merge with other examples",
                      "set data.packing: false (pairs are padded per micro batch)")
    if d.mix:
        yield Problem("data.mix", f"train.objective {obj} reads one preference source",
                      "merge the sources into one file and set data.path")
    if d.train_on != "assistant":
        yield Problem("data.train_on", f"train.objective {obj} scores the answers only",
                      "set data.train_on: assistant (the default)")
    if d.response_field is not None:
        yield Problem("data.response_field", f"train.objective {obj} reads the answers from "
                      f"data.chosen_field ({d.chosen_field}) and data.rejected_field "
                      f"({d.rejected_field})", "remove data.response_field")
    if d.prompt_field is not None and d.messages_field is not None:
        yield Problem("data.messages_field", "a pair's prompt comes from data.prompt_field or "
                      "data.messages_field, not both", "set one of them to null")
    if d.chosen_field == d.rejected_field:
        yield Problem("data.rejected_field", f"the same column as data.chosen_field "
                      f"({d.chosen_field})", "name the column of the dispreferred answers")


@rule
def _preference_reference(cfg: RunConfig) -> Iterator[Problem]:
    t = cfg.train
    if t.objective in ("dpo", "ipo") and t.reference == "adapters_off" \
            and cfg.freeze.policy != "lora":
        yield Problem("train.reference", "adapters_off uses the base under LoRA adapters as "
                      f"the reference, but freeze.policy is {cfg.freeze.policy}",
                      "set freeze.policy: lora, or train.reference: model or precomputed")
    if t.objective in REFERENCE_FREE and t.reference != "model":
        yield Problem("train.reference", f"{t.objective} uses no reference model, so "
                      f"reference {t.reference} does nothing", "remove train.reference "
                      "(or use objective dpo or ipo)")


@input_rule
def _preference_rows(cfg: RunConfig) -> Iterator[Problem]:
    """The first rows of the preference files, read as the ranks will read every row."""
    import os

    from launcher.checks import input_checks
    from launcher.checks.messages import BadRow
    from launcher.checks.preference_rows import row_pair
    real = getattr(cfg, "_obj", cfg)
    d = real.data
    if real.train.objective == "sft":
        return
    for key, path in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        if not path or not os.path.isfile(path):
            continue
        fmt = input_checks.file_format(path, d.format)
        if fmt in (None, "saved", "parquet"):
            continue  # the ranks' reader says what is wrong with these
        if fmt == "text":
            yield Problem("data.format", "preference data needs a prompt, a chosen and a "
                          "rejected answer per row, which a text file cannot hold",
                          "use jsonl/json/csv/parquet records (docs/preference.md)")
            continue
        try:
            rows, bad = input_checks.first_rows(path, fmt)
        except (OSError, UnicodeDecodeError, EOFError, ValueError) as exc:
            yield Problem(key, f"cannot read {path} as {fmt}: {exc}", "fix the file")
            continue
        names = list(dict.fromkeys(k for _, r in rows for k in r))
        for field in ("chosen_field", "rejected_field", "prompt_field", "messages_field"):
            col = getattr(d, field)
            if col and rows and col not in names:
                yield Problem(f"data.{field}", f"{path} has no column '{col}'",
                              f"set data.{field} to one of its columns ({', '.join(names)})")
                return
        read = len(rows) + len(bad)  # each row once: `rows` parsed, `bad` did not
        for n, r in rows:
            try:
                row_pair(d, r)
            except BadRow as exc:
                bad.append((n, str(exc)))
        if len(bad) > input_checks.bad_row_limit(d, read):
            named = "; ".join(f"row {n}: {why}" for n, why in sorted(bad)[:3])
            yield Problem(key, f"{len(bad)} of the first {read} rows of {path} are not "
                          f"preference pairs ({named})", "give each row a prompt and a chosen "
                          "and a rejected answer (docs/preference.md), or let "
                          "data.max_bad_rows skip bad rows")

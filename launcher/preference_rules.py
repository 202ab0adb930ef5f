"""Validate's rules for preference objectives (train.objective dpo, ipo, simpo, orpo): what
the pairs need from the data section and which reference each objective can use. Registered
with launcher/rules.py (imported by launcher/validate.py); torch-free."""
from __future__ import annotations

from typing import Iterator

from launcher.config import RunConfig
from launcher.errors import Problem
from launcher.rules import rule

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

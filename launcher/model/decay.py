"""Which parameters get weight decay: the HF Trainer's rule, so a recipe moved from the Trainer
(or from LLaMA-Factory and Axolotl, which leave the optimizer to it) trains the same model.

transformers 5 `Trainer.get_decay_parameter_names` = `trainer_pt_utils.get_parameter_names(model,
[nn.LayerNorm], patterns)`: a parameter decays unless a module on its path below the model is an
`nn.LayerNorm`, or its lower-cased name matches one of `NO_DECAY_PATTERNS` (biases and every
norm's weights: `input_layernorm`, `post_attention_layernorm`, `model.norm`, `ln_f`,
`final_layer_norm`, ...). Searching the patterns in the full name is the same as the Trainer's
search in each level's name suffix: every pattern that matches from a suffix's start (`^`) matches
at the `.` before it in the full name.

    groups = param_groups(model, masked=[], weight_decay=0.1)   # deepspeed.initialize's model_parameters

Only parameters that require grad reach the groups (frozen ones get no optimizer state).
"""
from __future__ import annotations

import re
from typing import Any

# transformers/trainer.py Trainer.get_decay_parameter_names (5.x)
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = [re.compile(p) for p in NO_DECAY_PATTERNS]


def decays_by_name(name: str) -> bool:
    """The name half of the rule (no module types): False for biases and norm weights."""
    return not any(p.search(name.lower()) for p in _NO_DECAY)


def decay_names(model: Any) -> set[str]:
    """Every parameter name (tied ones under each of their names) the HF Trainer decays."""
    import torch.nn as nn
    out: set[str] = set()

    def walk(module: Any, prefix: str, in_norm: bool) -> None:
        for pname in module._parameters:
            if module._parameters[pname] is None:
                continue
            full = f"{prefix}{pname}"
            if not in_norm and decays_by_name(full):
                out.add(full)
        for cname, child in module.named_children():
            walk(child, f"{prefix}{cname}.", in_norm or isinstance(child, nn.LayerNorm))

    walk(model, "", False)
    return out


def param_groups(model: Any, masked: list[Any], weight_decay: float) -> Any:
    """deepspeed.initialize's model_parameters (and the 8-bit optimizer's params): the trainable
    parameters, those the HF Trainer decays in the first group, the rest (biases, norms, and
    the row-masked matrices whose decay would move their frozen rows) in a second group with
    weight_decay 0. With weight_decay 0: one list (the same arithmetic)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [p for _, p in trainable]
    decays = decay_names(model)
    held = {id(p) for p in masked}
    decay = [p for n, p in trainable if n in decays and id(p) not in held]
    rest = [p for n, p in trainable if n not in decays or id(p) in held]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

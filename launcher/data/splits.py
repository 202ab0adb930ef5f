"""What the data path hands the loop: `Splits`, the train and eval rows of a run (one home, read
by launcher/data/loading.py for SFT rows and launcher/data/pairs.py for preference pairs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.data.mixing import Mixture
from launcher.data.tokenize import Tokens


@dataclass
class Splits:
    """What `load` returns: train and eval (None without eval data) examples, plus what happened.
    `mixture`: the draw by weight over data.mix's sources (None for one source), for the Sampler."""

    train: Tokens
    eval: Tokens | None
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    mixture: Mixture | None = None

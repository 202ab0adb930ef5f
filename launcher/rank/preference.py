"""Preference objectives on the ranks: DPO, IPO, SimPO and ORPO losses, the reference model
(a frozen copy, the base with LoRA adapters off, or log-probs precomputed before training),
and one micro batch's loss and metrics.

The losses (pure functions of per-sequence log-probs, tested against the published formulas):
  dpo    -logsigmoid(b*z)(1-e) - logsigmoid(-b*z)e,  z = (pc - pr) - (rc - rr)   summed log-probs
  ipo    (z - 1/(2b))^2,                            z as dpo over mean log-probs (TRL's IPO)
  simpo  -logsigmoid(b(pc - pr) - g)(1-e) - logsigmoid(-(b(pc - pr) - g))e       mean log-probs
  orpo   NLL(chosen) - l*logsigmoid(log odds(pc) - log odds(pr)),  odds(p) = p/(1-p), mean
with p/r the policy's log-probs of the chosen/rejected answer, rc/rr the reference's, b
train.beta, e train.label_smoothing, g train.simpo_gamma, l train.orpo_lambda. Rewards as TRL
logs them: b(p - r) (dpo, ipo), b*p (simpo), l*p (orpo); accuracy: chosen reward > rejected.

A micro batch holds B pairs as 2B rows (launcher/data/pairs.py: chosen rows, then rejected
rows), so the policy runs one forward pass over both answers; the reference one more (or none).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from launcher.data.chat import IGNORE
from launcher.common.log import get_logger

log = get_logger(__name__)

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
REFERENCE_FILE = "reference_logps.npz"
NEEDS_REFERENCE = ("dpo", "ipo")
MEAN_LOGPS = ("ipo", "simpo", "orpo")  # objectives over mean (length-normalised) log-probs


def uses_reference(t: Any) -> bool:
    return t.objective in NEEDS_REFERENCE


# ------------------------------------------------------------------ log-probs and losses
def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per row: the summed log-prob of its labelled tokens (fp32) and their count. Labels are
    not shifted (position t's logits predict label t+1), as Hugging Face causal LMs take them."""
    import torch
    labels = labels[:, 1:]
    mask = labels != IGNORE
    ids = torch.where(mask, labels, torch.zeros_like(labels))
    # fp32 log_softmax then gather: what the SFT loss (cross entropy) keeps and frees, so the
    # plan's loss terms hold for both (logsumexp would keep its fp32 input as well)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(pc, pr, rc, rr, beta: float, smoothing: float = 0.0):
    """Per pair: (loss, chosen reward, rejected reward) of DPO (Rafailov et al. 2023, eq. 7;
    conservative DPO's label smoothing)."""
    import torch.nn.functional as F
    z = (pc - pr) - (rc - rr)
    loss = -F.logsigmoid(beta * z) * (1 - smoothing) - F.logsigmoid(-beta * z) * smoothing
    return loss, beta * (pc - rc), beta * (pr - rr)


def ipo_loss(pc, pr, rc, rr, beta: float):
    """IPO (Azar et al. 2023, eq. 17) with beta as tau, on mean log-probs as TRL computes it."""
    z = (pc - pr) - (rc - rr)
    return (z - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)


def simpo_loss(pc, pr, beta: float, gamma: float, smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, eq. 6) on mean log-probs: no reference."""
    import torch.nn.functional as F
    z = beta * (pc - pr) - gamma
    loss = -F.logsigmoid(z) * (1 - smoothing) - F.logsigmoid(-z) * smoothing
    return loss, beta * pc, beta * pr


def orpo_loss(pc, pr, nll, lam: float):
    """ORPO (Hong et al. 2024, eq. 6-7): the chosen answer's NLL plus lam x the odds-ratio
    loss, on mean log-probs; no reference. `nll`: the chosen tokens' mean NLL over the batch."""
    import torch
    import torch.nn.functional as F
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    return nll - lam * F.logsigmoid(log_odds), lam * pc, lam * pr


def pair_loss(t: Any, logps: Any, counts: Any, ref: Optional[Any]) -> tuple[Any, dict]:
    """The batch's mean loss and its metrics (means over the pairs, 0-d tensors) for
    train.objective. `logps`, `counts`: the 2B rows' summed log-probs and token counts (chosen
    rows first); `ref`: the reference's summed log-probs of the same rows (dpo, ipo)."""
    b = logps.shape[0] // 2
    mean = logps / counts.clamp(min=1)
    lp = mean if t.objective in MEAN_LOGPS else logps
    pc, pr = lp[:b], lp[b:]
    if t.objective in NEEDS_REFERENCE:
        rl = ref / counts.clamp(min=1) if t.objective == "ipo" else ref
        rc, rr = rl[:b], rl[b:]
        if t.objective == "dpo":
            loss, wc, wr = dpo_loss(pc, pr, rc, rr, t.beta, t.label_smoothing)
        else:
            loss, wc, wr = ipo_loss(pc, pr, rc, rr, t.beta)
    elif t.objective == "simpo":
        loss, wc, wr = simpo_loss(pc, pr, t.beta, t.simpo_gamma, t.label_smoothing)
    elif t.objective == "orpo":
        nll = -logps[:b].sum() / counts[:b].sum().clamp(min=1)
        loss, wc, wr = orpo_loss(pc, pr, nll, t.orpo_lambda)
    else:
        raise ValueError(f"not a preference objective: {t.objective}")
    stats = {"rewards_chosen": wc.mean(), "rewards_rejected": wr.mean(),
             "reward_margin": (wc - wr).mean(), "reward_accuracy": (wc > wr).float().mean()}
    return loss.mean(), {k: v.detach().float() for k, v in stats.items()}


# ------------------------------------------------------------------ the reference
class Reference:
    """Log-probs of the frozen reference for a micro batch: `logps(batch, index)`."""

    def __init__(self, kind: str, forward: Any = None, table: Any = None, holder: Any = None):
        self.kind, self._forward, self.table, self.holder = kind, forward, table, holder

    def logps(self, batch: dict, index: Any) -> Any:
        import torch
        if self.table is not None:
            rows = self.table[index.cpu().numpy()]            # [B, 2]: chosen, rejected
            both = torch.as_tensor(rows.T.reshape(-1).copy(), dtype=torch.float32)
            return both.to(batch["input_ids"].device)
        with torch.no_grad():
            return self._forward(batch)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _logits_forward(module: Any) -> Any:
    def run(batch: dict) -> Any:
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return sequence_logps(out.logits, batch["labels"])[0]
    return run


def reference_ds_config(ds_config: dict) -> dict:
    """The inference engine's DeepSpeed config for the ZeRO-3 reference: the policy's ZeRO-3
    partitioning and precision, no optimizer or scheduler (TRL's `prepare_deepspeed`)."""
    import copy
    cfg = copy.deepcopy(ds_config)
    for k in ("optimizer", "scheduler"):
        cfg.pop(k, None)
    zero = cfg.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    return cfg


def build_model_reference(cfg: Any, device: str, ds_config: dict, tokenizer: Any,
                          load_model: Any) -> Reference:
    """train.reference model: the initial model loaded again (`load_model`: launcher/rank/train.py's,
    as the policy was), frozen, in eval mode; under ZeRO-3 partitioned as it loads (zero.Init)
    and wrapped in an inference engine (no optimizer)."""
    from launcher.model import tokens
    ref, hf_ds = load_model(cfg, device, ds_config)
    tokens.resize(ref, tokenizer)  # the same vocabulary as the policy
    ref.requires_grad_(False)
    ref.eval()
    holder: Any = ref
    if cfg.deepspeed.zero_stage == 3 and cfg.quantization.mode == "none":
        import deepspeed
        engine, *_ = deepspeed.initialize(model=ref, config=reference_ds_config(ds_config))
        engine.eval()
        holder = engine
    elif cfg.quantization.mode == "none":
        ref.to(device)
    return Reference("model", _logits_forward(holder), holder=(holder, hf_ds))


def build_adapters_off_reference(engine: Any) -> Reference:
    """train.reference adapters_off: the policy itself with its LoRA adapters switched off
    (peft's `disable_adapter`), so no second copy exists."""
    module = engine.module

    def run(batch: dict) -> Any:
        with module.disable_adapter():
            out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return sequence_logps(out.logits, batch["labels"])[0]
    return Reference("adapters_off", run)


def _table_key(cfg: Any, n_train: int, n_eval: int) -> str:
    """What the log-probs depend on: the model (its files' sizes and times too), quantization,
    freeze policy (new LoRA/embedding rows), data settings and seed, and the pair counts."""
    from launcher.config.schema import to_dict
    from launcher.data.cache import _files
    blob = json.dumps({"model": to_dict(cfg.model), "files": _files(cfg.model.path),
                       "quant": to_dict(cfg.quantization),
                       "freeze": to_dict(cfg.freeze), "data": to_dict(cfg.data),
                       "seed": cfg.train.seed, "n": [n_train, n_eval]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def table_paths(cfg: Any) -> list[str]:
    """Where precomputed log-probs are kept: the run directory (what a resume reads) and,
    with data.cache, the tokenized-data cache root (what later runs on the same data reuse)."""
    paths = [os.path.join(cfg.run_dir, REFERENCE_FILE)]
    if cfg.data.cache:
        from launcher.data.cache import cache_root
        paths.append(os.path.join(cache_root(cfg), "reference"))
    return paths


def _load_table(cfg: Any, key: str) -> Optional[dict]:
    import numpy as np
    for i, p in enumerate(table_paths(cfg)):
        path = p if i == 0 else os.path.join(p, f"{key}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return {"train": np.array(z["train"]),
                            "eval": np.array(z["eval"]) if "eval" in z else None}
    return None


def _save_table(cfg: Any, key: str, tables: dict) -> None:
    import io

    import numpy as np

    from launcher.common.files import write_atomic_bytes
    arrays = {"key": np.array(key), "train": tables["train"]}
    if tables.get("eval") is not None:
        arrays["eval"] = tables["eval"]
    for i, p in enumerate(table_paths(cfg)):
        path = p if i == 0 else os.path.join(p, f"{key}.npz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic_bytes(path, buf.getvalue())


def compute_table(s: Any, split: Any) -> Any:
    """[n, 2] summed log-probs (chosen, rejected) of every pair of `split` under the current
    policy in eval mode: rank r takes pairs r, r+world, ...; every rank runs the same number
    of forward passes (ZeRO-3 gathers in each); one all-reduce joins the shares."""
    import math

    import numpy as np
    import torch

    from launcher.rank.collectives import all_reduce_
    from launcher.data.pairs import collate_pairs
    n, rank, world = len(split), s.env.rank, s.env.world_size
    micro = s.cfg.train.micro_batch_size
    mine = list(range(rank, n, world))
    n_batches = math.ceil(math.ceil(n / world) / micro)
    out = torch.zeros((n, 2), dtype=torch.float64)
    was_training = s.engine.training
    s.engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * micro:(b + 1) * micro]
            batch = collate_pairs([split[i] for i in (idx or [0])], s.pad_id)
            batch.pop("num_tokens")
            batch.pop("index")
            batch = to_device(batch, s.device)
            res = s.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            lp = sequence_logps(res.logits, batch["labels"])[0].double().cpu()
            if idx:
                k = len(idx)
                out[idx, 0], out[idx, 1] = lp[:k], lp[k:]
    if was_training:
        s.engine.train()
    total = all_reduce_(out.to(s.device) if s.device != "cpu" else out)
    return np.asarray(total.cpu().numpy(), dtype=np.float64)


def build_precomputed_reference(s: Any) -> Reference:
    """train.reference precomputed: read the table of this run (a resume) or of the same
    model and data (the cache), else compute it with the initial policy and keep it."""
    splits = s.splits
    n_eval = len(splits.eval) if splits.eval is not None else 0
    key = _table_key(s.cfg, len(splits.train), n_eval)
    tables = _load_table(s.cfg, key)
    if tables is None:
        log.info(f"reference log-probs: one pass over {len(splits.train)} pairs before training")
        tables = {"train": compute_table(s, splits.train),
                  "eval": compute_table(s, splits.eval) if n_eval else None}
        if s.env.is_main and os.environ.get("FTLAUNCH_NO_SAVE", "") != "1":
            _save_table(s.cfg, key, tables)
    ref = Reference("precomputed", table=tables["train"])
    ref.eval_table = tables["eval"]  # type: ignore[attr-defined]
    return ref


def build_reference(s: Any, load_model: Any) -> Optional[Reference]:
    """The run's reference (None for sft, simpo, orpo); `load_model`: how the policy was loaded
    (launcher/rank/train.py), for a reference model."""
    t = s.cfg.train
    if not uses_reference(t):
        return None
    if t.reference == "adapters_off":
        return build_adapters_off_reference(s.engine)
    if t.reference == "precomputed":
        return build_precomputed_reference(s) if s.splits is not None else None
    return build_model_reference(s.cfg, s.device, s.ds_config, s.tokenizer, load_model)


# ------------------------------------------------------------------ one micro batch
def forward(s: Any, batch: dict, *, eval_table: Any = None) -> tuple[Any, dict]:
    """One micro batch of pairs (on the device): the policy's forward over both answers, the
    reference's log-probs, the loss and its metrics."""
    index = batch.pop("index")
    ref = None  # first: its forward's temporaries are freed before the policy's activations exist
    if s.reference is not None:
        if eval_table is not None:
            import torch
            rows = eval_table[index.cpu().numpy()]
            ref = torch.as_tensor(rows.T.reshape(-1).copy(), dtype=torch.float32).to(
                batch["input_ids"].device)
        else:
            ref = s.reference.logps(batch, index)
    out = s.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logps, counts = sequence_logps(out.logits, batch["labels"])
    del out
    return pair_loss(s.cfg.train, logps, counts, ref)


def evaluate(s: Any) -> float:
    """Mean preference loss over the eval pairs (every rank the same number of passes)."""
    import math

    import torch

    from launcher.rank.collectives import all_reduce_sum
    from launcher.data.pairs import collate_pairs
    ev = s.splits.eval
    micro, rank, world = s.cfg.train.micro_batch_size, s.env.rank, s.env.world_size
    mine = list(range(rank, len(ev), world))
    n_batches = math.ceil(math.ceil(len(ev) / world) / micro)
    table = getattr(s.reference, "eval_table", None)
    total, count = 0.0, 0.0
    s.engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * micro:(b + 1) * micro]
            batch = collate_pairs([ev[i] for i in (idx or [0])], s.pad_id)
            batch.pop("num_tokens")
            loss, _ = forward(s, to_device(batch, s.device), eval_table=table)
            total = total + loss.detach().float() * len(idx)
            count += len(idx)
    s.engine.train()
    total, count = all_reduce_sum([total, count], s.device)
    return total / count if count else float("nan")

"""validate's rules for the long-sequence switches: train.sequence_parallel, tiled_loss,
tiled_mlp, activation_offload (docs/long-sequences.md). Torch-free: the model's heads and
attention window are read from its config.json (launcher/model/info.py).

What sequence parallelism needs, and why:
- N divides the world size: the ranks form world / N data-parallel groups of N.
- N divides data.max_seq_len: every rank holds an equal 1/N slice of each (padded) sequence.
- N divides the attention heads, and the KV heads divide by N or N by them (DeepSpeed's
  UlyssesSPAttentionHF replicates KV heads when there are fewer than N): after the all-to-all
  each rank attends over the whole sequence with heads / N heads.
- An attention kernel the sequence-parallel attention calls through transformers' registry:
  eager, sdpa or flash_attention_2. Model code from the model folder (trust_remote_code) may call
  its own kernel, which would then see 1/N of the sequence; a sliding attention window would be
  dropped (the gathered attention is masked causally per document over the whole sequence).
"""
from __future__ import annotations

from typing import Iterator

from launcher.model import info as model_info
from launcher.config.schema import RunConfig
from launcher.config.errors import Problem
from launcher.checks.rules import rule

SP = "train.sequence_parallel"


def heads(model_cfg: dict) -> tuple[int | None, int | None]:
    """(attention heads, KV heads) of a config.json (text config for multimodal ones)."""
    text = model_cfg.get("text_config") if isinstance(model_cfg.get("text_config"), dict) else {}
    merged = {**model_cfg, **text}
    q = merged.get("num_attention_heads") or merged.get("n_head")
    kv = merged.get("num_key_value_heads") or q
    return (int(q) if isinstance(q, int) else None, int(kv) if isinstance(kv, int) else None)


def divisors(n: int, most: int = 64) -> list[int]:
    return [d for d in range(2, min(n, most) + 1) if n % d == 0]


@rule
def _sp_world(cfg: RunConfig) -> Iterator[Problem]:
    n, world = cfg.train.sequence_parallel, cfg.world_size
    if n > 1 and world % n:
        yield Problem(SP, f"{n} does not divide the world size {world} (nodes x gpus_per_node): "
                      "the ranks form data-parallel groups of N", "use one of "
                      f"{divisors(world) or [1]}, or change cluster.nodes / gpus_per_node")


@rule
def _sp_seq_len(cfg: RunConfig) -> Iterator[Problem]:
    n, length = cfg.train.sequence_parallel, cfg.data.max_seq_len
    if n > 1 and length % n:
        up = -(-length // n) * n
        yield Problem("data.max_seq_len", f"{length} is not divisible by {SP} = {n}: every rank "
                      "holds an equal slice of each sequence", f"use data.max_seq_len: {up}")


@rule
def _sp_heads(cfg: RunConfig) -> Iterator[Problem]:
    n = cfg.train.sequence_parallel
    model_cfg = model_info.model_config(cfg.model.path) if n > 1 else None
    if not model_cfg:
        return
    q, kv = heads(model_cfg)
    if q is not None and q % n:
        yield Problem(SP, f"the model's {q} attention heads do not divide by {n}: each rank "
                      f"attends with heads / N of them", f"use one of {divisors(q) or [1]}")
    elif kv is not None and kv % n and n % kv:
        yield Problem(SP, f"the model's {kv} KV heads and {n} do not divide one another (KV "
                      "heads are split over the ranks, or copied when fewer)",
                      f"use one of {[d for d in divisors(q or kv) if kv % d == 0 or d % kv == 0]}")
    window = model_cfg.get("sliding_window")
    if isinstance(window, int) and window < cfg.data.max_seq_len and model_cfg.get(
            "use_sliding_window", True) is not False:
        yield Problem(SP, f"the model attends within a sliding window of {window} tokens, which "
                      "the sequence-parallel attention does not apply (it masks causally over "
                      "the whole sequence)", f"leave {SP} at 1, or data.max_seq_len <= {window}")


@rule
def _sp_kernel(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.train.sequence_parallel > 1 and cfg.model.trust_remote_code:
        yield Problem(SP, "model code from the model folder (model.trust_remote_code) may call its "
                      "own attention instead of transformers' registry, which the sequence-"
                      "parallel attention replaces; it would attend over 1/N of the sequence",
                      f"use a model family shipped with transformers, or {SP}: 1")


@rule
def _tiled_mlp_zero3(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.train.tiled_mlp and cfg.deepspeed.zero_stage == 3:
        yield Problem("train.tiled_mlp", "under ZeRO-3 each MLP chunk gathers the layer's "
                      "weights, again in the backward; ranks whose sequences split into a "
                      "different number of chunks would wait on each other's gathers",
                      "use deepspeed.zero_stage 2 (or 0/1), or train.tiled_mlp: false")


@rule
def _offload_device(cfg: RunConfig) -> Iterator[Problem]:
    if cfg.train.activation_offload and cfg.train.device == "cpu":
        yield Problem("train.activation_offload", "CPU ranks keep activations in host memory "
                      "already: there is nothing to offload", "set it to false on CPU ranks")


@rule
def _sp_objective(cfg: RunConfig) -> Iterator[Problem]:
    """Preference pairs compute their log-probs from the model's logits (launcher/rank/
    preference.py); the sequence-parallel and tiled losses compute an SFT loss in the loop."""
    t = cfg.train
    if t.objective == "sft":
        return
    for key, on in ((SP, t.sequence_parallel > 1), ("train.tiled_loss", t.tiled_loss),
                    ("train.activation_offload", t.activation_offload)):
        if on:
            yield Problem(key, f"does not combine with train.objective {t.objective}: preference "
                          "pairs take their log-probs from the whole logits of both answers",
                          f"remove {key} for this run, or train with train.objective: sft")
            return

"""model.pad_token / special_tokens / add_tokens: the tokenizer changed, the embeddings resized,
the new rows trained (rank half; torch imported inside the functions).

    tok = inputs.load_tokenizer(cfg)           # calls apply_to_tokenizer: tokens added first,
                                               # so the data is tokenized with them
    model = load_model(...)
    new = resize(model, tok)                   # before the freeze: embedding + lm_head grow
    model, report = freeze.apply(model, cfg)
    train_new_rows(model, new, cfg)            # after the freeze, before deepspeed.initialize

New rows are initialised by transformers' `resize_token_embeddings` (the mean of the old rows).
They train whatever the freeze policy says: when the policy freezes the input embedding or the
output head, that matrix is made trainable with a gradient hook that keeps only the new rows'
gradients, and it goes in an optimizer group without weight decay, so the old rows stay exactly
as they were (launcher/model/decay.py `param_groups`). At ZeRO-3 (partitioned parameters) and under LoRA the whole
matrices train instead (LoRA: `freeze.also_train: [embeddings, lm_head]`, saved with the
adapter; validate asks for it). The exported tokenizer (final/) holds the added tokens.
"""
from __future__ import annotations

from typing import Any

from launcher.config.schema import RunConfig
from launcher.common.log import get_logger

log = get_logger(__name__)
_ADDED: dict[int, list[int]] = {}  # id(tokenizer) -> the ids apply_to_tokenizer added


def apply_to_tokenizer(tok: Any, cfg: RunConfig) -> list[int]:
    """Add model.special_tokens, model.add_tokens and model.pad_token; the ids of tokens that
    were not in the vocabulary before."""
    m = cfg.model
    before = len(tok)
    if m.special_tokens:
        tok.add_special_tokens({"extra_special_tokens": list(m.special_tokens)},
                               replace_extra_special_tokens=False)
    if m.add_tokens:
        tok.add_tokens(list(m.add_tokens))
    if m.pad_token is not None:
        if m.pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": m.pad_token})
        else:
            tok.pad_token = m.pad_token
    new = list(range(before, len(tok)))
    _ADDED[id(tok)] = new
    if new:
        log.info(f"tokenizer: {len(new)} new tokens (ids {new[0]}..{new[-1]})")
    return new


def resize(model: Any, tok: Any) -> list[int]:
    """Grow the input embedding and the output head to the tokenizer (call before the freeze).
    Returns the ids the run added to the tokenizer (their rows are new)."""
    weight = model.get_input_embeddings().weight
    rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]
    if len(tok) > rows:
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its note on mean resizing, once per matrix: ours says it
        try:
            model.resize_token_embeddings(len(tok), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(level)
        log.info(f"embeddings resized from {rows} to {len(tok)} rows (new rows: the mean of the "
                 "old ones)")
    return list(_ADDED.get(id(tok), []))


def _matrices(model: Any) -> list[Any]:
    emb = model.get_input_embeddings().weight
    out = [emb]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        out.append(head.weight)
    return out


def train_new_rows(model: Any, new_ids: list[int], cfg: RunConfig) -> list[Any]:
    """Make the new rows trainable (call after the freeze). Returns the matrices whose old
    rows must not decay (for launcher/model/decay.py `param_groups`)."""
    import torch
    if not new_ids or cfg.freeze.policy == "lora":
        return []
    masked = []
    for w in _matrices(model):
        if w.requires_grad:
            continue  # the policy trains the whole matrix already
        w.requires_grad_(True)
        if hasattr(w, "ds_id"):  # ZeRO-3: partitioned, no row mask
            log.warning("ZeRO-3: the whole embedding matrix trains for the new tokens")
            continue
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        keep[torch.tensor(new_ids, device=w.device)] = 1
        w.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))
        masked.append(w)
    return masked

"""Two gloo ranks compare sequence parallelism with the plain forward, for tests/test_longseq.py.

    python tests/longseq_worker.py OUT.json PORT

Each rank builds the same tiny fp32 Llama (4 heads, 2 KV heads), computes the plain loss and
gradients of a batch by itself (the project's collate and the model's own loss: the reference),
then the same batch with train.sequence_parallel 2 (launcher/rank/longseq.py: sp_collate, the Ulysses
attention, the loss computed in the loop), sums the gradients over the group and compares. For
eager and sdpa, with padded rows and with packed rows. Rank 0 writes the largest differences.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def examples(packed: bool) -> list[dict]:
    import random
    rnd = random.Random(7)
    rows = []
    for n in (13, 16):  # uneven lengths: padding in the first row
        ids = [rnd.randrange(3, 100) for _ in range(n)]
        row = {"input_ids": ids, "labels": [x if i > 2 else -100 for i, x in enumerate(ids)]}
        if packed:
            row["doc_lengths"] = [5, n - 5]
        rows.append(row)
    return rows


def model(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def grads(m) -> dict:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def main(out: str, port: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed
    from launcher.rank.train import skip_cpu_shm_op
    skip_cpu_shm_op()  # not used by training collectives; its first build takes minutes
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    from launcher.rank import longseq
    from launcher.data.batching import collate
    rank = dist.get_rank()
    sp = longseq.init_groups(2, rank)
    results = {}
    for attn in ("sdpa", "eager"):
        for packed in (False, True):
            rows = examples(packed)
            m = model(attn)
            ref = m(**collate(rows, 0, attn)).loss
            ref.backward()
            want = grads(m)
            m.zero_grad()
            undo = longseq.install_attention(m, sp)
            hidden = longseq.HiddenStates(m)
            loss, shown, _ = longseq.micro_loss(m, hidden, longseq.sp_collate(rows, 0, 2, rank),
                                                sp, tiled=packed)  # the tiled loss on packed rows
            loss.backward()
            got = grads(m)
            for g in got.values():
                dist.all_reduce(g, group=sp.group)
            undo()
            hidden.handle.remove()
            results[f"{attn}{'-packed' if packed else ''}"] = {
                "loss": abs(float(shown) - float(ref.detach())),
                "grad": max(float((got[n] - want[n]).abs().max()) for n in want),
                "grads": len(got) == len(want)}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


def _rank(r: int, out: str, port: str) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2")
    main(out, port)


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(_rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)

"""Build a tiny Llama-style model, a byte-level BPE tokenizer and small datasets, locally.

No hub: the model is made from a `LlamaConfig` (random weights, seeded) and saved with
`save_pretrained`, the tokenizer is trained with `tokenizers` on the generated corpus and saved
as a `PreTrainedTokenizerFast`; both load back through the real `from_pretrained` path.
The text is generated from a small grammar, so a model can learn it and the loss visibly falls.

    python examples/tiny_recipe.py OUT_DIR      # writes OUT_DIR/{model,tokenizer,data}
"""
from __future__ import annotations

import json
import os
import random
import sys

SUBJECTS = ["the cat", "a dog", "my friend", "the robot", "our teacher", "the bird", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "remembers", "builds"]
OBJECTS = ["the red ball", "a small house", "the old tree", "a blue car", "the river", "a song"]
PLACES = ["in the park", "at home", "near the sea", "on monday", "after lunch", "every day"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            for _ in range(n)]


def qa_pairs(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"what is {a} plus {b}? answer:", "response": f" {a + b}."})
    return out


def build_tokenizer(out_dir: str, corpus: list[str], vocab_size: int = 384,
                    extra_special: tuple[str, ...] = ()) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return out_dir


def build_model(out_dir: str, vocab_size: int, *, layers: int = 2, hidden: int = 64,
                heads: int = 4, intermediate: int = 128, max_positions: int = 256,
                seed: int = 0, tie_embeddings: bool = False) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def build(out_dir: str, *, layers: int = 2, hidden: int = 64, n_text: int = 400,
          n_qa: int = 200) -> dict[str, str]:
    """Everything a demo or test needs, under out_dir. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    text = sentences(n_text)
    qa = qa_pairs(n_qa)
    tok_dir = build_tokenizer(os.path.join(out_dir, "tokenizer"),
                              text + [q["prompt"] + q["response"] for q in qa])
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    model_dir = build_model(os.path.join(out_dir, "model"), vocab, layers=layers, hidden=hidden)
    # the tokenizer lives beside the weights too, as in a real checkpoint folder
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model_dir)
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)
    return {
        "model": model_dir,
        "tokenizer": tok_dir,
        "text": write_jsonl(os.path.join(data, "text.jsonl"), [{"text": s} for s in text]),
        "qa": write_jsonl(os.path.join(data, "qa.jsonl"), qa),
    }


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/build"
    for k, v in build(out).items():
        print(f"{k}: {v}")

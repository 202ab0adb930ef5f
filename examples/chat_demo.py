"""The chat demo: fine-tune a tiny model on chat data, then ask it a question in the template.

1. builds a tiny Llama and a tokenizer with ChatML's `<|im_start|>`/`<|im_end|>` tokens, and
   arithmetic conversations in two layouts (messages, ShareGPT), into examples/build/chat/
2. `ftlaunch data examples/chat.yaml --show 1`: tokens, the trained part, the mixture's shares
3. `ftlaunch run examples/chat.yaml --overwrite`: one CPU rank (or the local GPUs)
4. loads final/ and generates an answer to a new question rendered with the same template

    python examples/chat_demo.py [extra ftlaunch run arguments]
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build", "chat")
RUN_FILE = os.path.join(HERE, "chat.yaml")
SYSTEM = "you add two numbers."


def conversation(rng: random.Random) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM}]
    for _ in range(rng.choice([1, 2])):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        turns += [{"role": "user", "content": f"what is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    return turns


def build_assets(BUILD: str = BUILD) -> None:
    """The tiny chat model, its tokenizer and the two data files, under BUILD (once)."""
    if os.path.exists(os.path.join(BUILD, "data", "sharegpt.jsonl")):
        return
    sys.path.insert(0, HERE)
    import tiny_recipe
    from transformers import AutoTokenizer

    print(f"building the tiny chat model, tokenizer and data in {BUILD}", flush=True)
    rng = random.Random(0)
    convs = [conversation(rng) for _ in range(600)]
    corpus = [m["content"] for c in convs for m in c] + [str(i) for i in range(19)]
    tok_dir = tiny_recipe.build_tokenizer(os.path.join(BUILD, "tokenizer"), corpus, 320,
                                          extra_special=("<|im_start|>", "<|im_end|>"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir = tiny_recipe.build_model(os.path.join(BUILD, "model"), len(tok), hidden=64)
    tok.save_pretrained(model_dir)
    os.makedirs(os.path.join(BUILD, "data"), exist_ok=True)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    tiny_recipe.write_jsonl(os.path.join(BUILD, "data", "chat.jsonl"),
                            [{"messages": c} for c in convs[:450]])
    tiny_recipe.write_jsonl(os.path.join(BUILD, "data", "sharegpt.jsonl"),
                            [{"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                for m in c]} for c in convs[450:]])


def ftlaunch(*args: str) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print("$ ftlaunch " + " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a
                                   for a in args), flush=True)
    return subprocess.call([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env)


def ask(run_dir: str, question: str) -> str:
    """The fine-tuned model's answer to one question, prompt rendered with the built-in chatml."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, ROOT)
    from launcher.data.chat import CHATML
    final = os.path.join(run_dir, "final")
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, chat_template=CHATML, add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=end,
                             pad_token_id=tok.pad_token_id)
    print("prompt:\n" + prompt, end="")
    return tok.decode(out[0, ids.shape[1]:])


def main(extra: list[str]) -> int:
    build_assets()
    rc = ftlaunch("data", RUN_FILE, "--show", "1")
    rc = rc or ftlaunch("run", RUN_FILE, "--overwrite", *(extra or ["--nproc", "1"]))
    if rc:
        return rc
    sys.path.insert(0, ROOT)
    from launcher.config.runfile import load
    run_dir = load(RUN_FILE).run_dir
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        losses = [r["loss"] for r in map(json.loads, fh) if "loss" in r]
    print(f"\nloss on the assistant turns: {losses[0]:.3f} -> {losses[-1]:.3f}")
    answer = ask(run_dir, "what is 3 plus 4?")
    print(answer)
    follows = answer.endswith("<|im_end|>") and "plus" in answer
    print(f"\nthe answer {'follows' if follows else 'does not follow'} the template "
          "(an assistant turn ended by <|im_end|>)")
    return 0 if follows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The memory plan against what CPU ranks really hold: engine tensors and whole-process peak RSS.

    .venv/bin/python bench/plan_vs_measured.py [--models tiny,20m] [--doc docs/memory.md]

For each model and setting it writes a run file (train.device cpu, 2 ranks, packed sequences),
plans it with `launcher.memory.plan(cfg, world_size=2)`, then starts 2 ranks with torchrun that
build the engine exactly as training does (`launcher.rank.train.setup`) and run a few steps on
random full-length batches. Each rank reports:

- engine bytes read from its tensors (launcher.rank.engine_stats + the parameters' own storage):
  weights, gradients (after backward, at the accumulation boundary), fp32 masters, optimizer
  state (after the first step);
- peak RSS above its baseline: `VmHWM` after the steps minus `VmRSS` at the baseline, where
  the baseline is taken after every import and the process group, immediately before the
  tokenizer and model load, and the kernel's high-water mark is reset there
  (`/proc/self/clear_refs` <- 5), so the peak is the highest RSS from loading to the end.

The same module is the rank side (`--rank RUN.yaml ... --out OUT.json`), which the engine test
(tests/test_memory_engine.py) also starts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

# Ranks run with glibc's mmap threshold fixed at 64 KiB: freed tensors go back to the OS at
# once. With glibc's default (a threshold that rises to 32 MiB as large blocks are freed) the
# freed activations of one step stay in the heap and RSS reaches 1.3-2x the live tensors
# (measured: docs/memory.md). `--default-malloc` measures that too.
MMAP_THRESHOLD = 65536
BEGIN = "<!-- plan_vs_measured:begin -->"
END = "<!-- plan_vs_measured:end -->"


# ------------------------------------------------------------------ rank side
# Modules `train.setup` and the first steps import lazily (seen by diffing sys.modules): imported
# before the baseline, so the measured peak is the run's memory, not Python code objects.
PRE_IMPORT = (
    "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.moe",
    "deepspeed.module_inject", "deepspeed.ops.adam", "torch._inductor", "torch._dynamo",
    "torch._functorch", "torch.export", "torch.ao.quantization", "networkx",
    "transformers.convert_slow_tokenizer", "transformers.tokenization_utils_tokenizers",
    "transformers.integrations.deepspeed", "transformers.models.llama.modeling_llama",
    "transformers.integrations.sdpa_attention", "torch.optim.adamw", "xml.etree.ElementTree",
)
def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Sampler:
    """The highest RssAnon and RssFile of this process while the `with` block runs (read every
    2 ms by a thread: the kernel keeps a high-water mark of their sum only)."""

    def __init__(self, every_s: float = 0.002) -> None:
        import threading
        self.every_s, self.anon, self.file = every_s, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        self.anon = max(self.anon, _status("RssAnon"))
        self.file = max(self.file, _status("RssFile"))

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            self._read()

    def __enter__(self) -> "Sampler":
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._read()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def weight_bytes(module) -> int:
    """Bytes of parameter storage on this rank: data (full or gathered), ZeRO-3 partitions,
    bitsandbytes scales / absmax / codes, and buffers; shared storage counted once."""
    import torch
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for p in module.parameters():
        add(p.data)
        add(getattr(p, "ds_tensor", None))
        add(getattr(p, "SCB", None))
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for m in module.modules():  # Linear8bitLt moves CB / SCB to its state after a forward
        st = getattr(m, "state", None)
        if st is not None and hasattr(st, "SCB"):
            add(st.CB)
            add(st.SCB)
    for b in module.buffers():
        add(b)
    return total


def grad_storage_bytes(engine) -> int:
    """Bytes of the storage behind the gradient tensors engine_stats.grad_bytes reads: at
    ZeRO-1/2 those are views of a buffer that holds every overlapping parameter whole."""
    import torch
    w = engine.optimizer
    ts = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for attr in ("averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer"):
        v = getattr(w, attr, None)
        stack = [v]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                ts.append(x)
            elif isinstance(x, dict):
                stack += list(x.values())
            elif isinstance(x, (list, tuple)):
                stack += list(x)
    for attr in ("fp32_groups", "fp32_groups_flat_partition"):
        for t in getattr(w, attr, None) or []:
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(x, torch.Tensor) and x.grad is not None:
                    ts.append(x.grad)
    seen: dict[int, int] = {}
    for t in ts:
        if t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _grad_tensors(engine) -> tuple[list, list]:
    """(gradient tensors, DeepSpeed's reduce-bucket buffers) the engine holds right now."""
    import torch
    w = engine.optimizer
    grads = [g for p in engine.module.parameters()
             for g in (p.grad, getattr(p, "grad_accum", None)) if isinstance(g, torch.Tensor)]
    for attr in ("averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer"):
        stack = [getattr(w, attr, None)]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                grads.append(x)
            elif isinstance(x, dict):
                stack += list(x.values())
            elif isinstance(x, (list, tuple)):
                stack += list(x)
    buckets = []
    for bucket in (getattr(w, "ipg_buckets", None) or {}).values():
        buf = bucket.buffer
        buckets += [b for b in (buf if isinstance(buf, list) else [buf]) if isinstance(b, torch.Tensor)]
    return grads, buckets


def grads_at_backward_end(engine, loss) -> dict:
    """Queue a reading of the gradients at the end of autograd's backward (before DeepSpeed's
    epilogue reduces them): {"grads_bwd": bytes of gradient storage outside the reduce buckets,
    "buckets_bwd": bytes of the buckets}, filled when the backward ends."""
    import torch
    out: dict = {}

    def read() -> None:
        grads, buckets = _grad_tensors(engine)
        bucket_st = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                     for b in buckets if b.numel()}
        grad_st = {}
        for g in grads:
            if g.numel() and g.untyped_storage().data_ptr() not in bucket_st:
                grad_st[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        out["grads_bwd"] = sum(grad_st.values())
        out["buckets_bwd"] = sum(bucket_st.values())
        lp = next(engine.module.parameters()).element_size()
        out["bucket_grads_bwd"] = lp * sum(int(getattr(b, "elements", 0) or 0) for b in
                                           (getattr(engine.optimizer, "ipg_buckets", None) or {}).values())

    loss.register_hook(lambda g: torch.autograd.Variable._execution_engine.queue_callback(read))
    return out


def _torch_adam_for_offload(train_mod) -> None:
    """Tests only: optimizer offload with torch's AdamW instead of DeepSpeedCPUAdam, so no
    cpu_adam op is compiled (53 s); DeepSpeed's offload layout (fp32 slices and their gradients
    on the CPU) is the same, and so are the state bytes (two fp32 moments)."""
    build = train_mod.build_ds_config

    def patched(cfg, env, device):
        ds = build(cfg, env, device)
        if "offload_optimizer" in ds.get("zero_optimization", {}):
            ds["optimizer"]["params"]["torch_adam"] = True
            ds["zero_force_ds_cpu_optimizer"] = False
        return ds
    train_mod.build_ds_config = patched


def warm_engine(ds_config: dict) -> None:
    """A DeepSpeed engine over a 4x4 linear layer, with the run's ZeRO stage and precision, one
    step: imports the ~30 MB of code DeepSpeed loads lazily (torch._inductor, functorch, ...)."""
    import deepspeed
    import torch
    zero = {"stage": ds_config.get("zero_optimization", {}).get("stage", 0)}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "train_batch_size": torch.distributed.get_world_size(),
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "bf16": ds_config.get("bf16", {"enabled": False}), "zero_optimization": zero,
           "steps_per_print": 10**9}
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    dtype = next(engine.module.parameters()).dtype
    loss = engine(torch.ones(1, 4, dtype=dtype)).float().sum()
    engine.backward(loss)
    engine.step()
    engine.destroy() if hasattr(engine, "destroy") else None


def warm_bnb() -> None:
    """The 8-bit and 4-bit layers' training path once (bitsandbytes loads its CPU kernels)."""
    import bitsandbytes as bnb
    import torch
    for layer in (bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False),
                  bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16)):
        layer = layer.to("cpu")
        layer.train()
        x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()


def warm_code() -> None:
    """The code warm-up before the baseline (launcher.memory.probe.warm_code): code, not data."""
    from launcher.memory.probe import warm_code as warm
    warm()


def rank_main(run_files: list[str], out: str, steps: int) -> None:
    """Build each run's engine in turn (as training does), measure, write JSON (rank 0)."""
    import gc

    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (imported before the baseline)
    from transformers.models.llama import modeling_llama  # noqa: F401

    from launcher.rank import engine_stats, train
    from launcher.config import runfile
    from launcher.cluster.dist_env import from_environ
    import importlib
    for name in PRE_IMPORT:  # what setup() would import lazily: not the run's memory
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module missing changes nothing here
            pass

    env = from_environ()
    if os.environ.get("PVM_TORCH_ADAM_OFFLOAD") == "1":
        _torch_adam_for_offload(train)
    results = []
    for path in run_files:
        cfg = runfile.load(path)
        if cfg.quantization.mode != "none" or cfg.train.optimizer != "adamw":
            warm_bnb()
        train.init_distributed(cfg, env)
        warm_code()
        if os.environ.get("PVM_WARM_SHAPES") == "1":  # the run's own kernels below the baseline
            from launcher.memory.probe import kernel_bytes
            from launcher.memory.reference import sequences_per_micro_batch
            kernel_bytes(cfg.model.path, cfg.model.dtype, sequences_per_micro_batch(cfg),
                         cfg.data.max_seq_len, cfg.model.attn_implementation)
        warm_engine(train.build_ds_config(cfg, env, "cpu"))
        gc.collect()
        base = _status("VmRSS")
        base_anon, base_file = _status("RssAnon"), _status("RssFile")
        reset = _reset_peak()
        mods = set(sys.modules)
        loaded: dict = {}
        load_model = train.load_model

        def timed_load(*a, **k):  # the loading peak alone, before deepspeed.initialize
            with Sampler() as seen:
                out = load_model(*a, **k)
            loaded.update(load_peak=_status("VmHWM") - base, load_rss=_status("VmRSS") - base,
                          load_file=_status("RssFile"), load_anon_peak=seen.anon - base_anon,
                          load_file_peak=seen.file - base_file)
            return out
        train.load_model = timed_load
        try:
            s = train.setup(cfg, env, load_data=False)
        finally:
            train.load_model = load_model
        if os.environ.get("PVM_MODS"):
            print("NEWMODS", sorted(set(sys.modules) - mods), file=sys.stderr)
        after_init = _status("VmRSS") - base
        engine = s.engine
        engine.train()  # from_pretrained returns eval mode (no checkpointing); train_loop does this
        b, n = cfg.train.micro_batch_size, cfg.data.max_seq_len
        gen = torch.Generator().manual_seed(env.rank)
        vocab = engine.module.get_input_embeddings().weight.shape[0] if hasattr(
            engine.module, "get_input_embeddings") else 256
        rec: dict = {"run": path, "after_init": after_init, "peak_reset": reset,
                     "init_peak": _status("VmHWM") - base, **loaded}
        pairs = cfg.train.objective != "sft"  # a preference step: b pairs, 2b rows
        if pairs and s.reference is not None and s.reference.holder is not None:
            held = s.reference.holder[0]
            rec["reference"] = weight_bytes(getattr(held, "module", held))
        for step in range(steps):
            x = torch.randint(3, max(4, int(getattr(engine.module.config, "vocab_size", vocab))),
                              (2 * b if pairs else b, n), generator=gen)
            if pairs:
                from launcher.rank import preference
                labels = x.clone()
                labels[:, : n // 2] = -100  # the prompt half
                loss, _ = preference.forward(s, {"input_ids": x, "attention_mask": torch.ones_like(x),
                                                 "labels": labels, "index": torch.zeros(b, dtype=torch.long)})
            else:
                loss = engine(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
            phases = [_status("VmRSS") - base]
            at_bwd = grads_at_backward_end(engine, loss) if step == steps - 1 else {}
            engine.backward(loss)
            rec.update(at_bwd)
            phases.append(_status("VmRSS") - base)
            if step == steps - 1:
                rec["grads"] = engine_stats.grad_bytes(engine)
                rec["grads_storage"] = grad_storage_bytes(engine)
            engine.step()
            phases.append(_status("VmRSS") - base)
            phases.append(_status("VmHWM") - base)
            rec.setdefault("phases", []).append(phases)  # after fwd, bwd, step; peak so far
        rec["weights"] = weight_bytes(engine.module)
        rec["masters"] = engine_stats.fp32_master_bytes(engine)
        rec["optimizer"] = engine_stats.optimizer_state_bytes(engine)
        rec["peak"] = _status("VmHWM") - base
        rec["baseline"] = base
        per_rank = [None] * env.world_size
        dist.all_gather_object(per_rank, rec)
        results.append(per_rank)
        del s, engine, loss
        gc.collect()
    if env.rank == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    # Leave together and close the group: a rank that exits with gloo's threads still
    # running can abort in static destruction ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(run_files: list[str], out: str, steps: int = 3, nproc: int = 2,
              timeout: int = 600, extra_env: dict | None = None,
              default_malloc: bool = False) -> list[list[dict]]:
    """Start nproc ranks on this machine over run_files; returns per run, per rank records."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    if default_malloc:
        env.pop("MALLOC_MMAP_THRESHOLD_")
    env.update(extra_env or {})
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ftlaunch-torch-extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--rank", *run_files, "--out", out, "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ranks failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------ driver side
RUN = """\
name: {name}
model: {{path: {model}, dtype: {dtype}, gradient_checkpointing: {gc}}}
data: {{path: {data}, max_seq_len: {seq}, packing: true}}
train: {{max_steps: 10, micro_batch_size: {micro}, device: cpu, optimizer: {optimizer}}}
quantization: {{mode: {quant}}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}, offload_optimizer: {offload}}}
cluster: {{gpus_per_node: 2}}
output: {{dir: {out}}}
"""
LAST = "{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}"
HEAD = "{policy: patterns, also_train: [norms, lm_head]}"
SETTINGS = {  # name -> fields of RUN
    "z0 fp32 full": dict(stage=0, dtype="fp32"),
    "z1 bf16 full": dict(stage=1),
    "z2 bf16 full": dict(stage=2),
    "z2 bf16 frozen": dict(stage=2, freeze=LAST),
    "z2 bf16 full ckpt": dict(stage=2, gc="true"),
    "z3 bf16 full": dict(stage=3),
    "z3 fp32 frozen": dict(stage=3, dtype="fp32", freeze=LAST),
    "z2 bf16 8bit frozen": dict(stage=2, quant="8bit", freeze=HEAD),
}
MODELS = {  # name -> (layers, hidden, heads, intermediate, micro, seq)
    "tiny": (2, 64, 4, 128, 8, 256),
    "20m": (8, 448, 8, 1216, 4, 256),
}


def build_model(work: str, name: str) -> dict:
    import tiny_recipe
    base = os.path.join(work, "tiny")
    if not os.path.exists(os.path.join(base, "model", "config.json")):
        tiny_recipe.build(base)
    paths = {"model": os.path.join(base, "model"), "data": os.path.join(base, "data", "text.jsonl")}
    if name != "tiny":
        layers, hidden, heads, inter = MODELS[name][:4]
        d = os.path.join(work, name)
        if not os.path.exists(os.path.join(d, "config.json")):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(paths["model"])
            tiny_recipe.build_model(d, len(tok), layers=layers, hidden=hidden, heads=heads,
                                    intermediate=inter, max_positions=1024)
            tok.save_pretrained(d)
        paths["model"] = d
    return paths


def write_run(work: str, model: str, setting: str, paths: dict) -> str:
    micro, seq = MODELS[model][4:]
    fields = dict(name=f"{model}-{setting.replace(' ', '-')}", model=paths["model"],
                  data=paths["data"], dtype="bf16", gc="false", seq=seq, micro=micro,
                  optimizer="adamw", quant="none", freeze="{policy: full}", stage=2,
                  offload="none", out=os.path.join(work, "runs", model))
    fields.update(SETTINGS[setting])
    path = os.path.join(work, f"{fields['name']}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(RUN.format(**fields))
    return path


def measure(model: str, settings: list[str], work: str, steps: int = 3,
            default_malloc_too: bool = False) -> list[dict]:
    """Plan and measure each setting in its own pair of rank processes (clean RSS)."""
    from launcher import memory
    from launcher.config import runfile
    from launcher.memory import probe as runtime_probe
    paths = build_model(work, model)
    rows = []
    for setting in settings:
        run = write_run(work, model, setting, paths)
        cfg = runfile.load(run)
        # the kernels are measured on this machine, in this run (launcher/memory/probe.py)
        p = memory.plan(cfg, world_size=2, kernels=runtime_probe.measure(cfg))
        t0 = time.time()
        ranks = run_ranks([run], os.path.join(work, "out.json"), steps)[0]
        peak = max(r["peak"] for r in ranks)
        default = None
        if default_malloc_too:
            default = max(r["peak"] for r in run_ranks(
                [run], os.path.join(work, "out.json"), steps, default_malloc=True)[0])
        rows.append({"default_malloc_peak": default, "model": model, "setting": setting, "params": p.inv.total,
                     "trainable": p.inv.trainable, "plan_total": p.total_per_gpu,
                     "plan_tensors": p.peak_allocated, "measured_peak": peak,
                     "ratio": peak / p.total_per_gpu, "seconds": round(time.time() - t0, 1),
                     "plan_terms": {k: p.term(k) for k in ("weights", "gradients", "masters", "optimizer")},
                     "engine": {k: max(r[k] for r in ranks)
                                for k in ("weights", "grads", "grads_storage", "masters", "optimizer")},
                     "after_init": max(r["after_init"] for r in ranks)})
    return rows


def table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    out = ["| model | setting | params (trainable) | plan total MiB | measured peak MiB | "
           "measured/plan | default malloc: peak MiB (/plan) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("default_malloc_peak")
        dcell = f"{mib(d)} ({d / r['plan_total']:.2f})" if d else "-"
        out.append(f"| {r['model']} | {r['setting']} | {r['params']:,} ({r['trainable']:,}) | "
                   f"{mib(r['plan_total'])} | {mib(r['measured_peak'])} | {r['ratio']:.3f} | {dcell} |")
    out.append("")
    out.append("| model | setting | weights plan/engine | grads plan/engine | masters plan/engine "
               "| optimizer plan/engine |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for pk, ek in (("weights", "weights"), ("gradients", "grads_storage"), ("masters", "masters"),
                       ("optimizer", "optimizer")):
            cells.append(f"{r['plan_terms'][pk]:,} / {r['engine'][ek]:,}")
        out.append(f"| {r['model']} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(rows))
    mib = [r["plan_total"] / 2**20 for r in rows]
    ax.bar([i - 0.2 for i in x], mib, 0.4, label="plan")
    ax.bar([i + 0.2 for i in x], [r["measured_peak"] / 2**20 for r in rows], 0.4,
           label="measured peak RSS above baseline")
    if any(r.get("default_malloc_peak") for r in rows):
        ax.scatter(list(x), [(r.get("default_malloc_peak") or 0) / 2**20 for r in rows], color="k",
                   marker="_", s=200, label="measured, glibc default malloc")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{r['model']}\n{r['setting']}" for r in rows], rotation=60, ha="right",
                       fontsize=7)
    ax.set_ylabel("MiB per rank")
    ax.set_yscale("log")
    ax.set_title("Memory plan vs a CPU rank's peak (2 ranks, DeepSpeed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(doc: str, text: str, begin: str = BEGIN, end: str = END) -> None:
    with open(doc, encoding="utf-8") as fh:
        old = fh.read()
    if begin not in old or end not in old:
        raise SystemExit(f"{doc} lacks the markers {begin} / {end}")
    head, rest = old.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w", encoding="utf-8") as fh:
        fh.write(head + begin + "\n" + text + "\n" + end + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="tiny,20m")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--work", help="folder for models and run files (default: a temporary one)")
    ap.add_argument("--doc", help="write the table into this markdown file between the markers")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--plot", help="write a PNG bar chart of plan vs measured here")
    ap.add_argument("--default-malloc-too", action="store_true",
                    help="also measure with glibc's default (dynamic) mmap threshold")
    a = ap.parse_args(argv)
    if a.rank:
        rank_main(a.rank, a.out, a.steps)
        return 0
    work = a.work or tempfile.mkdtemp(prefix="plan_vs_measured.")
    rows = []
    for model in a.models.split(","):
        rows += measure(model, [s for s in a.settings.split(",") if s], work, a.steps,
                        a.default_malloc_too)
        for r in rows:
            if r["model"] == model:
                print(f"{r['model']:>5} {r['setting']:<22} plan {r['plan_total'] / 2**20:8.1f} MiB  "
                      f"measured {r['measured_peak'] / 2**20:8.1f} MiB  ratio {r['ratio']:.3f}  "
                      f"({r['seconds']} s)", flush=True)
    text = table(rows)
    print(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    if a.plot:
        plot(rows, a.plot)
    if a.doc:
        flags = [f"--models {a.models}"] if a.models != "tiny,20m" else []
        flags += ["--default-malloc-too"] if a.default_malloc_too else []
        flags += ["--json rows.json"] if a.json else []
        flags += [f"--plot {a.plot}"] if a.plot else []
        cmd = f"    .venv/bin/python bench/plan_vs_measured.py {' '.join(flags + ['--doc', a.doc])}\n"
        write_doc(a.doc, f"Written by `bench/plan_vs_measured.py` ({time.strftime('%Y-%m-%d')}, "
                         f"{a.steps} steps, 2 CPU ranks):\n\n{cmd}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

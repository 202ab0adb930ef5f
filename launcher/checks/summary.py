"""The one-screen summary `ftlaunch validate` prints for a valid run file."""
from __future__ import annotations

from launcher.dsconfig import build as ds_config
from launcher.config import epochs, secret_env
from launcher.config.schema import RunConfig
from launcher.config.batch import batch_sizes
from launcher.checks.input_checks import FIRST_ROWS


def summary(cfg: RunConfig) -> str:
    m, q, f, d, t, ds, c = (cfg.model, cfg.quantization, cfg.freeze, cfg.data, cfg.train,
                            cfg.deepspeed, cfg.cluster)
    micro, accum, global_batch = batch_sizes(cfg)
    freeze = {"full": "full fine-tune",
              "last_layers": f"last_layers ({f.trainable_layers:+d} blocks)",
              "patterns": f"patterns (train {f.train}, freeze {f.freeze})",
              "lora": f"lora (r={f.lora.r}, alpha={f.lora.alpha:g}, targets {f.lora.target_modules})"}[f.policy]
    if f.also_train:
        freeze += f" + {', '.join(f.also_train)}"
    quant = "none" if q.mode == "none" else (
        f"8bit (threshold {q.int8_threshold:g}, skip {q.skip_modules})" if q.mode == "8bit"
        else f"4bit {q.quant_type} (double {q.double_quant}, storage {q.storage_dtype})")
    offload = [f"optimizer->{ds.offload_optimizer}"] if ds.offload_optimizer != "none" else []
    offload += [f"params->{ds.offload_param}"] if ds.offload_param != "none" else []
    rows = [
        ("name", cfg.name),
        ("model", f"{m.path} ({m.dtype}{', grad checkpointing' if m.gradient_checkpointing else ''})"),
        ("quantization", quant),
        ("freeze", freeze),
        ("data", _data(cfg)),
        ("checked", f"the first {FIRST_ROWS} rows of each data file (the ranks read every row)"),
        ("ranks", f"{c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {cfg.world_size}"),
        ("batch", f"{micro} micro x {accum} accum x {cfg.world_size} ranks = {global_batch} sequences"
                  f" = {global_batch * d.max_seq_len:,} tokens/step"),
        ("schedule", f"{_steps(cfg)}, {t.optimizer} lr {t.lr:g}, {t.scheduler}, "
                     f"warmup {_warmup(cfg)}"),
        ("deepspeed", f"ZeRO-{ds.zero_stage}, "
                      f"{'config file ' + ds.config_file if ds.config_file else 'preset ' + ds_config.preset_name(cfg)}"
                      f"{', offload ' + ', '.join(offload) if offload else ''}"
                      f"{', overrides ' + ', '.join(ds.overrides) if ds.overrides else ''}"),
        ("slurm", ", ".join(x for x in (
            f"partition {c.partition}" if c.partition else "", f"time {c.time}",
            f"requeue up to {c.max_restarts}x" if c.requeue else "no requeue",
            _from_shell(cfg)) if x)),
        ("cpus", _cpus(cfg)),
        ("run dir", cfg.run_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _from_shell(cfg: RunConfig) -> str:
    """cluster.env_from_shell: the names, and those this shell does not set (values never shown)."""
    names = cfg.cluster.env_from_shell
    if not names:
        return ""
    unset = [p.message.split()[0] for p in secret_env.missing(cfg)]
    return f"from this shell: {', '.join(names)}" + (
        f" (not set here: {', '.join(unset)})" if unset else "")


def _steps(cfg: RunConfig) -> str:
    steps, note = epochs.planned_steps(cfg)
    if not note:
        return f"{steps} steps"
    return f"{cfg.train.epochs:g} epochs = about {steps} steps ({note})"


def _warmup(cfg: RunConfig) -> str:
    t = cfg.train
    if not t.warmup_ratio:
        return str(t.warmup_steps)
    return f"{t.warmup_ratio:g} x steps = {epochs.warmup_steps(cfg, epochs.planned_steps(cfg)[0])}"


def _cpus(cfg: RunConfig) -> str:
    """What each node's Slurm task gets (launcher/cluster/slurm.py `task_cpus`)."""
    from launcher.cluster.slurm import task_cpus
    n, why = task_cpus(cfg)
    ranks = cfg.cluster.gpus_per_node
    return (f"{n} per node's task ({why}), bound to them by Slurm; each rank "
            f"{max(1, n // ranks)} thread(s) (OMP_NUM_THREADS)")


def _data(cfg: RunConfig) -> str:
    """The data line: the file (or each source of data.mix with its weight) and how it is read."""
    d = cfg.data
    shape = (f"{d.max_seq_len} tokens{', packed' if d.packing else ''}"
             f"{', chat (' + (d.chat_template or 'the tokenizer template') + ')' if d.messages_field else ''}"
             f"{', prompt/response' if d.prompt_field else ''}")
    if d.mix:
        total = sum(m.weight for m in d.mix)
        srcs = "; ".join(f"{m.path} ({m.weight / total:.0%})" for m in d.mix)
        return f"mix of {len(d.mix)}: {srcs}; {shape}"
    return f"{d.path} ({d.format or 'format by extension'}, {shape})"

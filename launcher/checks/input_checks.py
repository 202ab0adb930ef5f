"""The run's inputs checked on the login node, without torch: data files, model weights,
tokenizer, chat template. `validate` runs these through its rule registry (as input rules: the
commands that are about to use the inputs run them, `plan` on a config.json alone does not).

Data: every source (data.path, data.mix[i].path, data.eval_path) exists, is not empty, and its
first rows (`FIRST_ROWS` of a jsonl/json/csv file; a parquet file's schema where pyarrow is
installed; a saved folder is left to the ranks) parse and have the configured columns with the
right types: text; prompt and response; messages with known roles (launcher/checks/messages.py, the
ranks' own reader). Bad rows among them are counted against data.max_bad_rows.
Model: config.json and safetensors weights (every shard of an index present) whose headers agree
with the config (vocabulary x width of the embedding, the number of blocks); a .bin-only folder
is accepted as it is (its tensors cannot be read without torch).
Tokenizer: tokenizer.json with a vocabulary (or a SentencePiece tokenizer.model, or vocab.json
with merges.txt), no id beyond the model's vocabulary; a chat template when chat data needs one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import TYPE_CHECKING, Any, Iterator

from launcher.checks import messages
from launcher.model import info as model_info
from launcher.config.data_files import format_of, open_text
from launcher.config.errors import Problem

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig, RunConfig

FIRST_ROWS = 100


# ------------------------------------------------------------------ the sources (both halves)
def source_settings(d: "DataConfig") -> list[tuple["DataConfig", float]]:
    """Each training source's data settings (a data.mix entry's keys over the data section's)
    and its weight; the data section itself when there is no mix."""
    import dataclasses
    if not d.mix:
        return [(d, 1.0)]
    out = []
    for m in d.mix:
        over = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                if f.name != "weight" and getattr(m, f.name) is not None}
        out.append((dataclasses.replace(d, mix=[], **over), float(m.weight)))
    return out


def sources(cfg: "RunConfig") -> list[tuple[str, "DataConfig"]]:
    """(key of its path, settings) of every source the run reads, eval data included."""
    d = cfg.data
    out = [(f"data.mix[{i}].path" if d.mix else "data.path", s)
           for i, (s, _) in enumerate(source_settings(d)) if s.path]
    if d.eval_path:
        import dataclasses
        out.append(("data.eval_path", dataclasses.replace(out[0][1] if out else d,
                                                          path=d.eval_path)))
    return out


def bad_row_limit(d: "DataConfig", rows: int) -> int:
    """How many bad rows data.max_bad_rows allows in a source of `rows` rows."""
    m = d.max_bad_rows
    return int(m) if m >= 1 or m == 0 else int(m * rows)


# ------------------------------------------------------------------ data


def file_format(path: str, fmt: str | None) -> str | None:
    """The format of a data source: "saved" for a folder, data.format if set, else the extension's."""
    if os.path.isdir(path):
        return "saved"
    return fmt or format_of(path)


def jsonl_lines(fh) -> "Iterator[tuple[int, str, Any, ValueError | None]]":
    """(line number, line, parsed value, None) for each non-blank line of a jsonl file, or
    (number, line, None, the ValueError) for a line that is not JSON."""
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield n, line, json.loads(line), None
        except ValueError as exc:
            yield n, line, None, exc


def first_rows(path: str, fmt: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The first rows of a jsonl/json/csv file as (row number, record), and the bad ones among
    them as (row number, why). OSError/UnicodeDecodeError for an unreadable file."""
    rows: list[tuple[int, dict]] = []
    bad: list[tuple[int, str]] = []
    fh = open_text(path)
    if fh is None:
        return rows, bad
    with fh:
        if fmt == "jsonl":
            for n, _, row, exc in jsonl_lines(fh):
                if len(rows) + len(bad) >= FIRST_ROWS:
                    break
                if exc is not None:
                    bad.append((n, f"not valid JSON ({exc})"))
                    continue
                (rows.append((n, row)) if isinstance(row, dict) else
                 bad.append((n, "a JSON value that is not an object with fields")))
        elif fmt == "json":
            text = fh.read(64 * 2**20)
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            if not isinstance(data, list):
                raise ValueError("the top level is not a JSON list of records")
            for n, row in enumerate(data[:FIRST_ROWS], 1):
                (rows.append((n, row)) if isinstance(row, dict) else
                 bad.append((n, "not an object with fields")))
        elif fmt == "csv":
            reader = csv.DictReader(io.StringIO("".join(fh.readline() for _ in range(FIRST_ROWS + 1))))
            rows = [(n, r) for n, r in enumerate(reader, 1)]
    return rows, bad


def _columns(path: str, fmt: str) -> list[str] | None:
    """A parquet file's columns from its schema (None without pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    return list(pq.read_schema(path).names)


def _row_problem(d: "DataConfig", row: dict) -> str | None:
    """What is wrong with one record for the configured columns, or None."""
    if d.messages_field is not None:
        try:
            messages.normalise(row[d.messages_field])
            if d.tools_field:
                messages.tools_of(row.get(d.tools_field))
        except messages.BadRow as exc:
            return f"'{d.tools_field if str(exc).startswith('tools:') else d.messages_field}' {exc}"
        return None
    cols = [d.prompt_field, d.response_field] if d.prompt_field else [d.text_field]
    for c in cols:
        v = row.get(c)
        if isinstance(v, (list, dict)):
            hint = (f" (a conversation: set data.messages_field: {c})"
                    if isinstance(v, list) and v and isinstance(v[0], dict) else "")
            return f"column '{c}' holds {type(v).__name__} values, not text{hint}"
    return None


def _wanted(d: "DataConfig") -> tuple[list[str], str]:
    if d.messages_field is not None:
        return [d.messages_field] + ([d.tools_field] if d.tools_field else []), "messages_field"
    if d.prompt_field is not None:
        return ([d.prompt_field, d.response_field or ""] + ([d.input_field] if d.input_field else []),
                "prompt_field")
    return [d.text_field], "text_field"


def data_problems(key: str, path: str, d: "DataConfig") -> Iterator[Problem]:
    """One source's problems (key: the config key of its path)."""
    if not os.path.exists(path):
        yield Problem(key, f"no such file or folder: {path}", "check the path")
        return
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        yield Problem(key, f"{path} is empty (0 bytes)", "point it at a file with examples")
        return
    fmt = file_format(path, d.format)
    if fmt in (None, "saved", "text"):
        return  # an unknown extension is reported by the ranks' reader with its fix; text: lines
    wanted, field = _wanted(d)
    field_key = key.rsplit(".", 1)[0] + "." + field if key.startswith("data.mix") else f"data.{field}"
    try:
        if fmt == "parquet":
            names = _columns(path, fmt)
            missing = [c for c in wanted if names is not None and c not in names]
            rows, bad = [], []
        else:
            rows, bad = first_rows(path, fmt)
            names = list(dict.fromkeys(k for _, r in rows for k in r)) if rows else None
            missing = [c for c in wanted if names is not None and c not in names]
    except (OSError, UnicodeDecodeError, EOFError, ValueError) as exc:
        yield Problem(key, f"cannot read {path} as {fmt}: {exc}", "fix the file, or set "
                      "data.format to its format")
        return
    if fmt != "parquet" and not rows and not bad:
        yield Problem(key, f"{path} holds no rows", "point it at a file with examples")
        return
    for c in missing:
        own = next((f for f in ("input_field", "tools_field", "response_field")
                    if getattr(d, f) == c and c != getattr(d, field)), None)
        ckey = field_key if own is None else field_key.rsplit(".", 1)[0] + "." + own
        chat = [n for n in ("messages", "conversations") if n in (names or [])]
        fix = f"set {ckey} to one of its columns ({', '.join(names or [])})"
        if chat and d.messages_field is None:
            fix += f", or data.messages_field: {chat[0]} for chat data"
        yield Problem(ckey, f"{path} has no column '{c}'", fix)
    if missing:
        return
    read = len(rows) + len(bad)  # each row once: `rows` parsed, `bad` did not
    bad = bad + [(n, why) for n, r in rows if (why := _row_problem(d, r))]
    if len(bad) > bad_row_limit(d, read):
        named = "; ".join(f"row {n}: {why}" for n, why in sorted(bad)[:3])
        yield Problem(key, f"{len(bad)} of the first {read} rows of {path} "
                      f"cannot be used ({named}; validate reads the first {FIRST_ROWS} rows, "
                      "the ranks read them all)", "fix those rows, point the field at the right "
                      "column, or let data.max_bad_rows skip bad rows")


# ------------------------------------------------------------------ model and tokenizer
def model_problems(cfg: "RunConfig") -> Iterator[Problem]:
    """Weights present and matching config.json (safetensors headers)."""
    path = cfg.model.path
    mc = model_info.model_config(path)
    if not os.path.isdir(path) or mc is None:
        return  # reported by the folder rule
    try:
        tensors = model_info.weight_tensors(path)
    except model_info.WeightsError as exc:
        yield Problem("model.path", f"the weights cannot be read: {exc}", "copy the model folder "
                      "again (every shard the index names, complete)")
        return
    if not tensors:
        if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
            return
        yield Problem("model.path", f"{path} holds no weights (no *.safetensors or "
                      "pytorch_model*.bin), only " + ", ".join(sorted(os.listdir(path))[:6]),
                      "point it at a complete save_pretrained folder (config.json and the weights)")
        return
    yield from _shape_problems(path, mc, tensors)


def _shape_problems(path: str, mc: dict, tensors: dict) -> Iterator[Problem]:
    vocab, hidden = mc.get("vocab_size"), model_info.hidden_size(mc)
    emb = next((n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight",
                                                   "word_embeddings.weight"))), None)
    if emb and isinstance(vocab, int) and hidden:
        shape = tensors[emb]["shape"]
        if shape != [vocab, hidden]:
            yield Problem("model.path", f"{emb} in {tensors[emb]['file']} has shape {shape}, but "
                          f"config.json says vocab_size {vocab} x hidden_size {hidden}",
                          "the weights and config.json are from different models: copy the "
                          "folder again")
    layers = model_info.num_layers(mc)
    found = {int(m.group(1)) for n in tensors if (m := re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", n))}
    if layers and found and max(found) + 1 != layers:
        yield Problem("model.path", f"the weights hold {max(found) + 1} blocks, config.json says "
                      f"num_hidden_layers {layers}", "the weights and config.json are from "
                      "different models: copy the folder again")
    odd = sorted({t["dtype"] for t in tensors.values()} - set(model_info.SAFETENSORS_BYTES))
    if odd:
        yield Problem("model.path", f"the weights hold tensors of unknown dtype {odd}",
                      "save the model again with save_pretrained")


def tokenizer_vocab(folder: str) -> int | None:
    """Entries (highest id + 1) of a tokenizer.json; None where there is none; 0 if empty.
    ValueError for an unreadable file."""
    p = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as fh:
        tj = json.load(fh)
    vocab = (tj.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", 0) for t in tj.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else 0


def tokenizer_problems(cfg: "RunConfig") -> Iterator[Problem]:
    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    folder = cfg.model.tokenizer or cfg.model.path
    if not os.path.isdir(folder):
        return  # reported by the folder rules
    try:
        n = tokenizer_vocab(folder)
    except (OSError, ValueError, AttributeError) as exc:
        yield Problem(key, f"{folder}/tokenizer.json cannot be read: {exc}",
                      "save the tokenizer again with save_pretrained")
        return
    other = [f for f in ("tokenizer.model", "vocab.json", "spiece.model")
             if os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f))]
    if n is None and not other:
        yield Problem(key, f"{folder} holds no tokenizer (no tokenizer.json, tokenizer.model or "
                      "vocab.json)", "copy the tokenizer files into the model folder, or set "
                      "model.tokenizer to a folder saved with tokenizer.save_pretrained")
        return
    if n == 0 and not other:
        yield Problem(key, f"{folder}/tokenizer.json has an empty vocabulary",
                      "save the tokenizer again with save_pretrained")
        return
    mc = model_info.model_config(cfg.model.path) or {}
    vocab = mc.get("vocab_size")
    if n and isinstance(vocab, int) and n > vocab:
        yield Problem(key, f"the tokenizer has ids up to {n - 1}, the model's vocab_size is "
                      f"{vocab}", "use the model's own tokenizer (or resize the embeddings and "
                      "save the model again)")


def template_problems(cfg: "RunConfig") -> Iterator[Problem]:
    folder = cfg.model.tokenizer or cfg.model.path
    for key, d in sources(cfg):
        if d.messages_field is None and not (d.prompt_field and d.chat_template):
            continue
        tkey = key.rsplit(".", 1)[0] + ".chat_template" if key.startswith("data.mix") \
            else "data.chat_template"
        if d.chat_template is None:
            if os.path.isdir(folder) and messages.tokenizer_template(folder) is None:
                yield Problem(tkey, f"chat data needs a chat template and the tokenizer in "
                              f"{folder} has none", "set data.chat_template: chatml, or a path "
                              "to a Jinja file")
        elif messages.template_file(d.chat_template) is not None:
            p = d.chat_template
            if not os.path.isfile(p):
                yield Problem(tkey, f"no such chat template file: {p}", "give a Jinja file, or "
                              f"a built-in name ({', '.join(messages.BUILTIN_TEMPLATES)})")
            elif os.path.getsize(p) == 0:
                yield Problem(tkey, f"the chat template {p} is empty", "write the template in it")
    yield from _rendered_problems(cfg, folder)


def _template_of(d: "DataConfig", folder: str) -> str | None:
    """The Jinja text a chat source renders with (None where it cannot be read here)."""
    if d.chat_template is None:
        return messages.tokenizer_template(folder) if os.path.isdir(folder) else None
    if messages.template_file(d.chat_template) is None:
        return messages.CHATML
    try:
        with open(d.chat_template, encoding="utf-8") as fh:
            return fh.read() or None
    except OSError:
        return None


def _vocab_tokens(folder: str) -> set[str] | None:
    """The token strings of a tokenizer.json (vocabulary and added tokens); None without one."""
    try:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as fh:
            tj = json.load(fh)
    except (OSError, ValueError):
        return None
    vocab = (tj.get("model") or {}).get("vocab") or {}
    out = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab if isinstance(v, list) and v}
    return out | {t.get("content") for t in tj.get("added_tokens") or [] if isinstance(t, dict)}


def _rendered_problems(cfg: "RunConfig", folder: str) -> Iterator[Problem]:
    """What the ranks would find on rendering: the chat template renders the first rows (with
    jinja2, as transformers does; a template that refuses a row, as Gemma's refuses a system
    message, is found here); ChatML on a tokenizer without its markers; tools with a template
    that does not show them."""
    said: set[str] = set()
    for key, d in sources(cfg):
        if key == "data.eval_path" or (d.messages_field is None and not (d.prompt_field and d.chat_template)):
            continue
        base = key.rsplit(".", 1)[0] if key.startswith("data.mix") else "data"
        own = base != "data" and cfg.data.mix[int(base[9:-1])].chat_template is not None
        tkey = f"{base}.chat_template" if own else "data.chat_template"  # where it was set
        template = _template_of(d, folder)
        if template is None:
            continue
        if template == messages.CHATML and os.path.isdir(folder):
            have = _vocab_tokens(folder)
            added = set(cfg.model.special_tokens) | set(cfg.model.add_tokens)
            lost = [m for m in messages.CHATML_MARKERS if have is not None and m not in have | added]
            if lost and tkey not in said:
                said.add(tkey)
                yield Problem(tkey, f"chatml marks turns with {' and '.join(lost)}, which the "
                              f"tokenizer in {folder} does not have: each splits into several "
                              "tokens, the sequences grow, and an exported model cannot stop on "
                              "one end-of-turn token", "add them: model.special_tokens: "
                              f"{list(messages.CHATML_MARKERS)} (their embeddings train), or use "
                              "the tokenizer's own template (chat_template: null) or a Jinja file")
        if d.tools_field and "tools" not in template:
            yield Problem(f"{base}.tools_field", "the chat template never reads `tools`, so the "
                          "function schemas would not reach the prompt", f"set {tkey} to chatml "
                          "(it lists them in a system turn) or a template that renders tools")
        fmt = file_format(d.path, d.format) if d.path and os.path.isfile(d.path) else None
        if fmt not in ("jsonl", "json", "csv"):
            continue
        try:
            render = messages.jinja_renderer(template, _special_tokens(folder))
            rows, _ = first_rows(d.path, fmt)
        except ImportError:
            return  # no jinja2 here: the ranks render
        except Exception as exc:  # noqa: BLE001 - a template that does not compile, a bad file
            if isinstance(exc, (OSError, ValueError)):
                continue
            yield Problem(tkey, f"the chat template does not compile: {type(exc).__name__}: "
                          f"{str(exc)[:200]}", "fix the template")
            continue
        refused = []
        for n, row in rows:
            conv = _conversation(d, row)
            if conv is None:
                continue
            try:
                tools = messages.tools_of(row.get(d.tools_field)) if d.tools_field else None
                render(conv, tools=tools)
            except messages.BadRow:
                continue  # counted by the data rule
            except Exception as exc:  # noqa: BLE001 - raise_exception, a Jinja error
                refused.append((n, f"{type(exc).__name__}: {str(exc)[:160]}"))
        if len(refused) > bad_row_limit(d, len(rows)):
            n, why = refused[0]
            system = any(m.get("role") == "system" for _, r in rows[:1]
                         for m in (_conversation(d, r) or []))
            yield Problem(tkey, f"the chat template refuses {len(refused)} of the first {len(rows)} "
                          f"rows of {d.path} (row {n}: {why})",
                          ("the template takes no system message: merge it into the first user "
                           "turn, or use chatml or a Jinja file that takes one" if system else
                           "fix those rows, use a template that takes them, or let "
                           "data.max_bad_rows skip them"))


def _conversation(d: "DataConfig", row: dict) -> list[dict] | None:
    try:
        if d.messages_field is not None:
            return messages.normalise(row.get(d.messages_field))
        return [{"role": "user", "content": str(row.get(d.prompt_field) or "")},
                {"role": "assistant", "content": str(row.get(d.response_field) or "")}]
    except messages.BadRow:
        return None


def _special_tokens(folder: str) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer folder (the variables templates use)."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as fh:
            tc = json.load(fh)
    except (OSError, ValueError):
        return {}
    out = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = tc.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[k] = v
    return out

"""Reading training data: a file or saved folder -> the texts (and prompts) of its usable rows.

Files. `data.path` is a jsonl/json/csv/parquet/text file (format from the extension unless
`data.format` says; `.gz`/`.bz2`/`.xz`/`.zst` compressed files too) or a folder written by
`datasets.save_to_disk` (its `train` split, or its only split). A json file is a list of
records; a text file is one example per line (its lines are the text, whatever text_field says).
Files are read through a link with a plain name in a private temporary folder, so symlinks,
unicode, spaces and glob characters (`[`, `*`) in paths all work, and the `datasets` cache lives
there too (never in the user's home); it is removed after reading.

Rows. Rows whose text (or response) is missing or blank, and rows whose prompt is missing, are
dropped with a warning giving the count; blank lines of a text file are such rows. Numbers in a
text column are read as their text; lists or objects are an error.

Eval split. `split_eval` holds out `data.eval_fraction` of the records by a permutation seeded
with `train.seed` (identical on every rank; the rest stays in file order).

Every problem is a `ConfigError` (source "data") naming the key, the file and the fix (`fail`).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher.config.errors import ConfigError, Problem, did_you_mean
from launcher.checks.input_checks import jsonl_lines
from launcher.config.data_files import EXTENSIONS, compression, extension, format_of, open_text
from launcher.checks.input_checks import bad_row_limit
from launcher.common.log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig, RunConfig

_BUILDER = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
_LINK_EXT = {"jsonl": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet", "text": "txt"}
_FIX = {"saved": "point it at a folder written by Dataset.save_to_disk",
        "jsonl": "one JSON object per line (fix or remove that line, or let data.max_bad_rows "
                 "skip bad lines)",
        "json": "a JSON list of records, e.g. [{\"text\": ...}, ...] (or use jsonl)",
        "csv": "a comma-separated file with a header row",
        "parquet": "a parquet file (pandas.DataFrame.to_parquet)",
        "text": "a UTF-8 text file, one example per line"}


# ------------------------------------------------------------------------------ shared helpers
print_warning = get_logger(__name__).warning  # stderr, rank 0 only (launcher/common/log.py)


def fail(key: str, message: str, fix: str = "") -> ConfigError:
    """The ConfigError (source "data") for one problem with `key`."""
    return ConfigError([Problem(key, message, fix)], "data")


# ------------------------------------------------------------------------------ the file
def source_format(path: str, key: str, fmt: str | None) -> str:
    if os.path.isdir(path):
        if fmt not in (None, "saved"):
            raise fail("data.format", f"{path} is a folder, but format '{fmt}' reads one file",
                       "point the path at the file, or use format: saved (or null) for a folder "
                       "written by datasets' save_to_disk")
        return "saved"
    if fmt == "saved":
        raise fail("data.format", f"format 'saved' needs a folder written by save_to_disk, but "
                   f"{path} is a file", "set format to the file's format, or null to infer it "
                   "from the extension")
    if fmt is not None:
        return fmt
    ext = extension(path)
    if format_of(path) is None:
        raise fail("data.format", f"cannot tell the format of {path} from its extension "
                   f"'{ext or '(none)'}'", "set data.format: jsonl, json, csv, parquet or text "
                   f"(known extensions: {', '.join(sorted(EXTENSIONS))})")
    return EXTENSIONS[ext]


def _check_path(path: str, key: str) -> None:
    if os.path.exists(path):
        if not os.access(path, os.R_OK):
            raise fail(key, f"{path} is not readable (permission denied)",
                       "fix its permissions (chmod a+r) or copy it somewhere readable")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise fail(key, f"{path} is empty (0 bytes)", "point it at a file with examples")
        return
    if os.path.islink(path):
        raise fail(key, f"{path} is a broken symlink (to {os.readlink(path)})",
                   "fix the link or point the path at the real file")
    parent = os.path.dirname(path) or "."
    hint = ""
    if os.path.isdir(parent):
        near = did_you_mean(os.path.basename(path), os.listdir(parent))
        hint = f" ({near})" if near else ""
    else:
        hint = f" (the folder {parent} does not exist either)"
    raise fail(key, f"no such file or folder: {path}{hint}", "check the path")


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _json_kind(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _first_bad_json(path: str, fmt: str, *, first_only: bool = False) -> str | None:
    """What is wrong with a json/jsonl file: its first bad line (jsonl) or its top level (json);
    None when nothing is found. first_only: look only at the first value (cheap; run before
    datasets, whose JSON reader crashes the process on a file starting with `null`)."""
    import lzma

    try:
        fh = open_text(path)
        if fh is None:
            return None
        with fh:
            if fmt == "json":
                if first_only:
                    head = fh.read(4096).lstrip()
                    if not head or head[0] in "[{":
                        return None
                try:
                    data = json.loads(head + fh.read()) if first_only else json.load(fh)
                except ValueError as exc:
                    return f"not valid JSON: {exc}"
                if not isinstance(data, list):
                    return (f"the top level is a JSON {_json_kind(data)}, not a list of records")
                return None
            for n, line, row, exc in jsonl_lines(fh):
                if exc is not None:
                    return f"line {n} is not valid JSON ({exc}): {line.strip()[:80]!r}"
                if not isinstance(row, dict):
                    return f"line {n} is a JSON {_json_kind(row)}, not an object with fields"
                if first_only:
                    return None
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc})"
    except (OSError, EOFError, lzma.LZMAError) as exc:
        return f"cannot decompress: {exc}"
    return None


def _unreadable(path: str, key: str, fmt: str, exc: BaseException) -> ConfigError:
    """A library failure while reading, as a ConfigError naming the file and the cause."""
    if "corresponds to no data" in str(exc):
        return fail(key, f"{path} holds no rows", "point it at a file with examples")
    detail = _first_bad_json(path, fmt) if fmt in ("json", "jsonl") else None
    if detail is None:
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            detail = f"not UTF-8 text ({cause})"
        else:
            text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            detail = f"{type(cause).__name__}: {text[:300]}"
    return fail(key, f"cannot read {path} as {fmt}: {detail}", _FIX[fmt])


# ------------------------------------------------------------------------------ datasets
def _load_saved(datasets, path: str, key: str):
    """The training split of a folder written by save_to_disk."""
    ds = datasets.load_from_disk(os.path.realpath(path), keep_in_memory=True)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(names) == 1:
            ds = ds[names[0]]
        else:
            raise fail(key, f"{path} holds the splits {', '.join(names)} and no "
                       "'train'", "save the training split alone, or name it 'train'")
    return ds


def _load_file(datasets, path: str, key: str, fmt: str, columns: list[str], tmp: str):
    """A data file read by datasets' builder for its format, through a link in `tmp`."""
    # a plain name in a private folder: glob characters, unicode, hidden names and
    # symlinks in the user's path cannot confuse datasets' file resolution
    suffix = "".join(c for c in os.path.basename(path).lower() if c.isascii()
                     and (c.isalnum() or c == "."))
    comp = compression(suffix)
    link = os.path.join(tmp, "data." + _LINK_EXT[fmt] + comp)
    os.symlink(os.path.realpath(path), link)
    if fmt in ("json", "jsonl"):
        bad = _first_bad_json(path, fmt, first_only=True)
        if bad:
            raise fail(key, f"cannot read {path} as {fmt}: {bad}", _FIX[fmt])
    # csv: the text columns as written ("12", not 12.0)
    extra = {"converters": {c: str for c in columns}} if fmt == "csv" else {}
    return datasets.load_dataset(_BUILDER[fmt], data_files=link, split="train",
                                 cache_dir=os.path.join(tmp, "cache"), keep_in_memory=True,
                                 **extra)


def read_columns(path: str, key: str, fmt: str, columns: list[str]) -> tuple[dict[str, list], list[str]]:
    """Read a file or saved folder with `datasets`: ({column: values} for the wanted columns that
    exist, every column name). Any failure becomes a ConfigError naming the file."""
    import datasets
    import datasets.utils.logging as ds_logging

    datasets.disable_progress_bars()
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    tmp = tempfile.mkdtemp(prefix="ftlaunch-data-")
    try:
        try:
            if fmt == "saved":
                ds = _load_saved(datasets, path, key)
            else:
                ds = _load_file(datasets, path, key, fmt, columns, tmp)
            names = list(ds.column_names)
            table = ds.with_format("arrow")  # whole columns at once (row iteration is slow)
            return {c: table[c].to_pylist() for c in columns if c in names}, names
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any library failure becomes a named problem
            raise _unreadable(path, key, fmt, exc) from None
    finally:
        ds_logging.set_verbosity(level)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ rows
def _as_text(values: list, key: str, column: str, path: str) -> list[str | None]:
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(None if v != v else str(v))  # NaN (pandas' missing) is missing
        else:
            fix = "point the field at a column of strings"
            if isinstance(v, list) and v and isinstance(v[0], dict):
                fix = (f"it holds conversations: set data.messages_field: {column} (and "
                       f"data.chat_template if the tokenizer has none) instead of {key}")
            raise fail(key, f"column '{column}' of {path} holds {type(v).__name__} values "
                       f"(row {i + 1}), not text", fix)
    return out


@dataclass
class Records:
    """The usable rows of one source: texts (plain text, or responses), prompts (None unless
    prompt/response), chats (None unless chat: each a list of {role, content}); `row_numbers`:
    their 1-based rows in the file (for errors about one row)."""

    texts: list[str]
    prompts: list[str] | None
    dropped: int
    rows: int
    chats: list[list[dict]] | None = None
    row_numbers: list[int] | None = None
    bad: list[tuple[int, str]] | None = None  # rows that could not be used: (row, why)

    def __len__(self) -> int:
        return len(self.chats) if self.chats is not None else len(self.texts)


def _wanted(d: "DataConfig", fmt: str) -> tuple[list[str], str]:
    """The columns to read and the key that names them."""
    if fmt == "text":
        for k in ("prompt_field", "messages_field"):
            if getattr(d, k) is not None:
                raise fail(f"data.{k}", "a text file has one example per line and no "
                           "prompt/response or messages columns", "use jsonl/json/csv/parquet "
                           f"records with that column, or set {k} to null")
        return ["text"], "data.text_field"  # a text file's lines are the text
    if d.messages_field is not None:
        return [d.messages_field] + ([d.tools_field] if d.tools_field else []), "data.messages_field"
    if d.prompt_field is not None:
        return ([d.prompt_field, d.response_field or ""] + ([d.input_field] if d.input_field else []),
                "data.prompt_field")
    return [d.text_field], "data.text_field"


def _missing_columns(d: "DataConfig", path: str, fmt: str, missing: list[str], names: list[str],
                     field_key: str) -> ConfigError:
    problems = []
    for c in missing:
        k = ("data.response_field" if c == d.response_field and c != d.prompt_field
             else field_key)
        near = did_you_mean(c, names)
        msg = (f"{path} has no column '{c}'" + (f" ({near})" if near else "")
               + f"; its columns: {', '.join(names) or '(none)'}")
        fix = f"set {k} to one of its columns"
        if k == "data.text_field" and d.prompt_field is None and {"prompt", "response"} <= set(names):
            fix += ", or set prompt_field: prompt and response_field: response for loss on " \
                   "the response only"
        chat = [n for n in ("messages", "conversations") if n in names]
        if k == "data.text_field" and chat:
            fix += f", or set messages_field: {chat[0]} for chat data"
        if fmt == "json" and len(names) == 1:
            fix += " (a json file must be a top-level list of records)"
        problems.append(Problem(k, msg, fix))
    return ConfigError(problems, "data")


def check_bad_rows(d: "DataConfig", bad: list[tuple[int, str]], rows: int, key: str, path: str,
                   warnings: list[str] | None) -> None:
    """Rows that could not be read: a warning naming them (None: no warning yet, more may
    come), or a ConfigError past the limit."""
    if not bad:
        return
    bad = sorted(bad)
    named = "; ".join(f"row {r}: {why}" for r, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    limit = bad_row_limit(d, rows)
    if len(bad) > limit:
        raise fail(key, f"{len(bad)} of {rows} rows of {path} cannot be used ({named})",
                   "fix or remove those rows, or let data.max_bad_rows (a count, or a fraction "
                   f"of the rows; now {d.max_bad_rows:g}) skip them")
    if warnings is not None:
        warnings.append(f"{key}: skipped {len(bad)} of {rows} rows of {path} that cannot be used "
                        f"(data.max_bad_rows {d.max_bad_rows:g}): {named}")


def _tolerant_jsonl(path: str, columns: list[str]) -> tuple[dict[str, list], list[str], list,
                                                            list[int]]:
    """A jsonl file read line by line: the wanted columns of the good rows, every column name
    seen, the bad lines as (line, why), and the good rows' line numbers."""
    cols: dict[str, list] = {c: [] for c in columns}
    names: dict[str, None] = {}
    bad, numbers = [], []
    fh = open_text(path)
    if fh is None:
        raise ValueError("zstd")
    with fh:
        for n, _, row, exc in jsonl_lines(fh):
            if exc is not None:
                bad.append((n, f"not valid JSON ({exc})"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"a JSON {_json_kind(row)}, not an object"))
                continue
            names.update(dict.fromkeys(row))
            numbers.append(n)
            for c in columns:
                cols[c].append(row.get(c))
    return {c: v for c, v in cols.items() if c in names}, list(names), bad, numbers


def _read(d: "DataConfig", path: str, key: str, fmt: str, wanted: list[str]):
    """read_columns, except that a jsonl file with bad lines is read line by line (when
    data.max_bad_rows allows any): (columns, names, bad rows, the good rows' numbers or None)."""
    try:
        return (*read_columns(path, key, fmt, wanted), [], None)
    except ConfigError:
        if fmt != "jsonl" or d.max_bad_rows == 0:
            raise
        cols, names, bad, numbers = _tolerant_jsonl(path, wanted)
        if not bad:
            raise
        return cols, names, bad, numbers


class Chat(list):
    """One conversation's messages, and the function schemas of its row (`tools`, or None)."""
    tools: list | None = None


def _chat(conv: list[dict], tools: list | None) -> Chat:
    out = Chat(conv)
    out.tools = tools
    return out


def _chat_records(d: "DataConfig", column: list, path: str, key: str, lines: list[int],
                  bad: list[tuple[int, str]], tools: list | None = None) -> Records:
    """The conversations of a messages column (with each row's `tools` where data.tools_field
    names a column); rows that are none are added to `bad` (checked against data.max_bad_rows
    here, and again with the template's refusals after rendering)."""
    from launcher.checks.messages import BadRow, normalise, tools_of

    chats, numbers, bad = [], [], list(bad)
    for i, v in enumerate(column):
        try:
            chats.append(_chat(normalise(v), tools_of(tools[i]) if tools is not None else None))
            numbers.append(lines[i])
        except BadRow as exc:
            bad.append((lines[i], f"'{d.messages_field}' {exc}"))
    rows = len(column) + len(bad) - (len(column) - len(chats))
    if not chats:
        raise fail("data.messages_field", f"no row of {path} holds a conversation (row "
                   f"{bad[-1][0]}: {bad[-1][1]})", "point messages_field at a column of "
                   "[{role, content}, ...] lists (or ShareGPT [{from, value}, ...])")
    check_bad_rows(d, bad, rows, key, path, None)
    return Records(texts=[], prompts=None, dropped=len(bad), rows=rows, chats=chats,
                   row_numbers=numbers, bad=bad)


def records(cfg: "RunConfig", path: str, key: str, warnings: list[str],
            d: "DataConfig | None" = None) -> Records:
    """The usable rows of the file or folder at `path` (config key `key`; `d`: the data settings
    of this source, default cfg.data); a warning for the dropped ones goes to `warnings`."""
    d = d or cfg.data
    _check_path(path, key)
    fmt = source_format(path, key, d.format)
    wanted, field_key = _wanted(d, fmt)
    cols, names, bad, lines = _read(d, path, key, fmt, wanted)
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise _missing_columns(d, path, fmt, missing, names, field_key)
    rows = len(next(iter(cols.values())))
    if rows == 0:
        raise fail(key, f"{path} holds no rows", "point it at a file with examples")
    lines = lines or list(range(1, rows + 1))
    if d.messages_field is not None:
        return _chat_records(d, cols[d.messages_field], path, key, lines, bad,
                             cols[d.tools_field] if d.tools_field else None)
    check_bad_rows(d, bad, rows + len(bad), key, path, warnings)
    if d.prompt_field is not None:
        prompts = _as_text(cols[d.prompt_field], "data.prompt_field", d.prompt_field, path)
        texts = _as_text(cols[d.response_field], "data.response_field", d.response_field, path)
        if d.input_field:  # alpaca: instruction + "\n" + input, where input is not empty
            inputs = _as_text(cols[d.input_field], "data.input_field", d.input_field, path)
            prompts = [p if p is None or not (x or "").strip() else f"{p}\n{x}"
                       for p, x in zip(prompts, inputs)]
        keep = [i for i in range(rows) if prompts[i] is not None
                and texts[i] is not None and texts[i].strip()]
        what = f"a missing prompt or an empty '{d.response_field}'"
        if d.chat_template is not None:  # a user and an assistant turn, rendered by the template
            chats = [_chat([{"role": "user", "content": prompts[i]},
                            {"role": "assistant", "content": texts[i]}], None) for i in keep]
            return Records(texts=[], prompts=None, dropped=rows - len(keep), rows=rows,
                           chats=chats, row_numbers=[lines[i] for i in keep])
    else:
        column = wanted[0]
        prompts = None
        texts = _as_text(cols[column], field_key, column, path)
        keep = [i for i in range(rows) if texts[i] is not None and texts[i].strip()]
        what = f"an empty or missing '{column}'" + (" (blank lines)" if fmt == "text" else "")
    dropped = rows - len(keep)
    if not keep:
        raise fail(key, f"every one of the {rows} rows of {path} has {what}",
                   "fill the examples in, or point the path at the right file/column")
    if dropped:
        kept = set(keep)
        first = next(i for i in range(rows) if i not in kept)
        warnings.append(f"{key}: dropped {dropped} of {rows} rows of {path} with {what} "
                        f"(first: row {first + 1})")
    return Records(texts=[texts[i] for i in keep],
                   prompts=None if prompts is None else [prompts[i] for i in keep],
                   dropped=dropped, rows=rows, row_numbers=[lines[i] for i in keep])


def subset(rec: Records, idx: list[int]) -> Records:
    def pick(xs: list | None) -> list | None:
        return None if xs is None else [xs[i] for i in idx]
    return Records(texts=pick(rec.texts) if rec.chats is None else [], prompts=pick(rec.prompts),
                   dropped=0, rows=len(idx), chats=pick(rec.chats), row_numbers=pick(rec.row_numbers))


def split_eval(rec: Records, fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, eval): `fraction` of the records held out by a permutation seeded with `seed`."""
    import numpy as np

    n = len(rec)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise fail("data.eval_fraction", f"holding out {fraction} of {n} examples leaves none "
                   "for training", "lower data.eval_fraction or add data")
    perm = np.random.default_rng([int(seed), 0xE7A1]).permutation(n)
    held = set(int(i) for i in perm[:n_eval])
    train = [i for i in range(n) if i not in held]
    return subset(rec, train), subset(rec, sorted(held))

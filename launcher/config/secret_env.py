"""Secrets never written in clear: which names and values look secret, the run-file rules that
refuse them in `cluster.env` (and literal assignments in `cluster.setup`, keys in
`deepspeed.overrides`), the pass-through list `cluster.env_from_shell` checked against the
submitting environment, and the copy of a config that may leave the machine (W&B) with secret
values replaced.

A name looks secret when it contains TOKEN, KEY, SECRET, PASSWORD, PASSWD or CREDENTIAL
(any case), or is one of `KNOWN`; names in `NOT_SECRET` (TOKENIZERS_PARALLELISM, ...) and names
ending in _FILE, _PATH or _DIR (the place a secret is kept, not the secret) do not. A value looks
secret when it has the form of a well-known token (Hugging Face hf_..., OpenAI sk-..., AWS AKIA...,
GitHub ghp_..., Slack xox?-...), whatever its name. No message here ever repeats a value.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Any, Iterator, Mapping

import yaml

from launcher.config.schema import ENV_NAME, RunConfig
from launcher.config.errors import ConfigError, Problem

PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
KNOWN = frozenset({"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "COMET_API_KEY", "NEPTUNE_API_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD", "GITHUB_TOKEN", "GH_TOKEN", "NGC_API_KEY",
                   "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "MYSQL_PWD"})
# Names with a secret-looking part that hold no secret (set in cluster.env every day).
NOT_SECRET = frozenset({"TOKENIZERS_PARALLELISM", "NCCL_IB_PKEY", "HF_HUB_DISABLE_IMPLICIT_TOKEN"})
_LOCATION = re.compile(r".*_(FILE|PATH|DIR)")
_TOKEN_VALUE = re.compile(r"(?<![A-Za-z0-9_-])(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|(AKIA|ASIA)[0-9A-Z]{16}"
                          r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[abposr]-[A-Za-z0-9-]{10,})")
REDACTED = "<not recorded: secret>"
OPT_OUT = "cluster.allow_secrets_in_env"
# Set by the job script or the per-node launcher for the ranks; a user value would be overwritten.
RESERVED_ENV = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "NODE_RANK", "GROUP_RANK"}


def looks_secret(name: str) -> bool:
    """Whether an environment variable of this name most likely holds a secret."""
    upper = name.upper()
    if upper in KNOWN:
        return True
    if upper in NOT_SECRET or _LOCATION.fullmatch(upper):
        return False
    return any(part in upper for part in PARTS)


def secret_value(value: Any) -> bool:
    """Whether a value has the form of a well-known access token."""
    return isinstance(value, str) and _TOKEN_VALUE.search(value) is not None


def _fix(name: str) -> str:
    return (f"remove it from the run file and the command line, export {name} in the shell that "
            f"submits, and list it in cluster.env_from_shell: [{name}] (the job takes it from "
            f"that environment; its value is written nowhere); or, to write it in clear anyway, "
            f"set {OPT_OUT}: true")


# ------------------------------------------------------------------ run-file rules
# Each a rule of its own (launcher/checks/validate.py), so that a problem elsewhere silences none of them.
def env_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Secret-looking cluster.env variables (unless the opt-out is set)."""
    c = cfg.cluster
    if c.allow_secrets_in_env:
        return
    for name, value in c.env.items():
        if looks_secret(name) or secret_value(value):
            why = "looks like a secret" if looks_secret(name) else "has the form of an access token"
            yield Problem(f"cluster.env.{name}", f"{name} {why}: its value would be written in "
                          "clear to job.sbatch and resolved.yaml in the run directory (often on "
                          "a shared file system) and kept by Slurm with the batch script",
                          _fix(name))


def setup_problems(cfg: RunConfig) -> Iterator[Problem]:
    """cluster.setup lines that assign a literal value to a secret-looking name."""
    c = cfg.cluster
    if c.allow_secrets_in_env:
        return
    for i, line in enumerate(c.setup):
        for name in literal_assignments(line):
            yield Problem(f"cluster.setup[{i}]", f"assigns a literal value to {name}, which "
                          "looks like a secret: the line is written in clear to job.sbatch",
                          f"{_fix(name)}; or read it at run time from a private file "
                          f"(export {name}=\"$(cat ~/.secrets/{name.lower()})\")")


def override_problems(cfg: RunConfig) -> Iterator[Problem]:
    """Secret-looking keys or token values in deepspeed.overrides (e.g. comet.api_key)."""
    if cfg.cluster.allow_secrets_in_env:
        return
    for key in secret_keys(cfg.deepspeed.overrides, "deepspeed.overrides"):
        yield Problem(key, "looks like a secret: deepspeed.overrides are written in clear to "
                      "ds_config.json and resolved.yaml",
                      "remove it and give it through the environment variable the tool reads "
                      "(e.g. COMET_API_KEY), listed in cluster.env_from_shell; or set "
                      f"{OPT_OUT}: true")


def pass_through_problems(cfg: RunConfig) -> Iterator[Problem]:
    """cluster.env_from_shell names that cannot work."""
    c = cfg.cluster
    seen: set[str] = set()
    for i, name in enumerate(c.env_from_shell):
        key = f"cluster.env_from_shell[{i}]"
        if not ENV_NAME.fullmatch(name):
            yield Problem(key, f"{name!r} is not a valid environment variable name",
                          "use letters, digits and _, not starting with a digit")
        elif name in seen:
            yield Problem(key, f"{name} is listed twice", "list it once")
        elif name in c.env:
            yield Problem(key, f"{name} is also set in cluster.env: the job would see the run "
                          "file's value, not the submitting shell's",
                          f"remove {name} from cluster.env (or from env_from_shell)")
        elif name.startswith("SLURM_") or name in RESERVED_ENV:
            yield Problem(key, f"{name} is set by Slurm or the launcher for every rank",
                          f"remove {name} from cluster.env_from_shell")
        seen.add(name)


def literal_assignments(line: str) -> list[str]:
    """Secret-looking names a shell line assigns a literal value to (`export HF_TOKEN=hf_x`,
    `HF_TOKEN=x cmd`); a value read at run time (`$(cat FILE)`, `$VAR`) is no literal."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []  # reported by the cluster rules
    out = []
    for w in words:
        name, eq, value = w.partition("=")
        literal = value and "$" not in value and "`" not in value
        if eq and ENV_NAME.fullmatch(name) and literal and (looks_secret(name) or secret_value(value)):
            out.append(name)
    return out


def secret_keys(tree: Any, prefix: str) -> Iterator[str]:
    """Dotted keys under prefix whose name looks secret or whose value looks like a token."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}"
            if isinstance(v, (dict, list)):
                yield from secret_keys(v, key)
            elif isinstance(v, str) and v and (looks_secret(str(k)) or secret_value(v)):
                yield key
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from secret_keys(v, f"{prefix}[{i}]")


def override_holds_secret(text: str) -> bool:
    """Whether a `key.sub=value` override sets, or holds anywhere in its value, something that
    looks secret (its value is then never shown in a message)."""
    name, eq, raw = text.partition("=")
    if not eq:
        return False
    if looks_secret(name.split(".")[-1]) or secret_value(raw) or literal_assignments(raw):
        return True
    try:
        tree = yaml.safe_load(raw)
    except yaml.YAMLError:
        return False
    return any(secret_keys(tree, name)) or any(
        literal_assignments(v) for v in (tree if isinstance(tree, list) else []) if isinstance(v, str))


# ------------------------------------------------------------------ at submit time
def missing(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """A Problem for each name of cluster.env_from_shell unset or empty in environ."""
    environ = os.environ if environ is None else environ
    return [Problem(f"cluster.env_from_shell[{i}]", f"{name} is not set in this environment (or "
                    "is empty): the job takes its value from the environment it is submitted from",
                    f"export {name}=... in this shell first, or remove {name} from "
                    "cluster.env_from_shell")
            for i, name in enumerate(cfg.cluster.env_from_shell) if not environ.get(name)]


def require(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> None:
    """ConfigError naming every pass-through variable missing from environ."""
    found = missing(cfg, environ)
    if found:
        raise ConfigError(found, "environment")


def in_clear(cfg: RunConfig) -> list[str]:
    """The keys whose secret-looking values the opt-out lets through (written in clear)."""
    c = cfg.cluster
    if not c.allow_secrets_in_env:
        return []
    keys = [f"cluster.env.{n}" for n, v in c.env.items() if looks_secret(n) or secret_value(v)]
    keys += [f"cluster.setup[{i}]" for i, line in enumerate(c.setup) if literal_assignments(line)]
    return keys + list(secret_keys(cfg.deepspeed.overrides, "deepspeed.overrides"))


def warn_in_clear(cfg: RunConfig) -> None:
    """The opt-out's warning, on stderr (every command that reads such a run file says it)."""
    keys = in_clear(cfg)
    if keys:
        from launcher.common.log import get_logger
        get_logger(__name__).warning(
            f"{OPT_OUT} is true: the secret-looking values of {', '.join(keys)} are written IN "
            f"CLEAR to job.sbatch, resolved.yaml and ds_config.json under {cfg.run_dir}, which "
            "anyone who can read that folder can read, and Slurm keeps the batch script; pass "
            "them with cluster.env_from_shell instead"
            + ("" if cfg.output.private else ", or at least set output.private: true"))


# ------------------------------------------------------------------ copies that leave the machine
def redacted(tree: dict) -> dict:
    """A config tree (config.to_dict) with the values of secret-looking cluster.env variables,
    deepspeed.overrides keys and setup lines replaced by REDACTED: what W&B may record."""
    out = dict(tree)
    cluster = dict(out.get("cluster") or {})
    env = cluster.get("env") or {}
    cluster["env"] = {k: REDACTED if looks_secret(k) or secret_value(v) else v for k, v in env.items()}
    cluster["setup"] = [REDACTED if literal_assignments(line) else line
                        for line in cluster.get("setup") or []]
    out["cluster"] = cluster
    ds = dict(out.get("deepspeed") or {})
    ds["overrides"] = _redact_tree(ds.get("overrides") or {})
    out["deepspeed"] = ds
    return out


def _redact_tree(tree: Any, name: str = "") -> Any:
    if isinstance(tree, dict):
        return {k: _redact_tree(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redact_tree(v, name) for v in tree]
    if isinstance(tree, str) and tree and (looks_secret(name) or secret_value(tree)):
        return REDACTED
    return tree

"""Chat rows without any library: one conversation as a list of {role, content} messages.

Both halves read rows through here: the login-node checks (`launcher/checks/input_checks.py`, first
rows of a file) and the ranks (`launcher/data/`, every row), so a row refused by `validate` is
refused by the ranks for the same reason, in the same words.

Layouts. `{"role": ..., "content": ...}` messages (roles system, user, assistant, tool) and the
ShareGPT layout `{"from": ..., "value": ...}` (human, gpt, system; observation and function_call
as in LLaMA-Factory) are both read; a conversation is told apart by its first message.

Chat templates. `data.chat_template` is null (the tokenizer's own), a built-in name
(`BUILTIN_TEMPLATES`) or a Jinja file.
"""
from __future__ import annotations

import json
import os
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool",
                  "function_call": "assistant"}
BUILTIN_TEMPLATES = ("chatml",)
# ChatML; `{% generation %}` marks the trained part (the content and its <|im_end|>); `tools`
# (function schemas of tool-calling data, data.tools_field) go in a system block, one JSON per line
CHATML = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call these functions:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class BadRow(ValueError):
    """A row that is not a conversation; the message says what is wrong with it."""


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def normalise(value: Any, answer: bool = True) -> list[dict[str, str]]:
    """One row's messages as [{"role", "content"}] (ShareGPT turned into roles); BadRow if the
    value is not a list of messages with known roles and text content. Messages are numbered
    from 1 in the messages, as rows are. answer=False: a prompt, which needs no assistant
    message (a preference pair's conversation so far)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # csv/parquet columns may hold the list as JSON text
        except ValueError:
            raise BadRow("holds a string, not a list of messages") from None
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"holds {_kind(value)}, not a list of messages")
    if not value:
        raise BadRow("holds an empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"message {i + 1} is {_kind(m)}, not an object with role and content")
        if "from" in m and "role" not in m:
            role = SHAREGPT_ROLES.get(str(m.get("from")).lower())
            content, role_key, text_key = m.get("value"), "from", "value"
            known = sorted(SHAREGPT_ROLES)
        else:
            role = m.get("role") if m.get("role") in ROLES else None
            content, role_key, text_key = m.get("content"), "role", "content"
            known = list(ROLES)
        if role is None:
            raise BadRow(f"message {i + 1} has {role_key} {m.get(role_key)!r}; known: "
                         f"{', '.join(known)}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRow(f"message {i + 1} has {_kind(content)} as its {text_key}, not text")
        out.append({"role": role, "content": content})
    if answer and not any(m["role"] == "assistant" for m in out):
        raise BadRow("has no assistant message (nothing to learn)")
    return out


def template_file(value: str) -> str | None:
    """The Jinja file a data.chat_template value names, or None for a built-in name."""
    if os.path.basename(value) in BUILTIN_TEMPLATES and not os.path.exists(value):
        return None
    return value


def tokenizer_template(folder: str) -> str | None:
    """The chat template saved in a tokenizer folder (chat_template.jinja, chat_template.json or
    tokenizer_config.json's chat_template), as text; None when it has none."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            text = fh.read()
        return text if text.strip() else None
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                t = json.load(fh).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict)
                      and x.get("name") == "default"), None)
        if isinstance(t, str) and t.strip():
            return t
    return None


def tools_of(value: Any) -> list | None:
    """A row's function schemas (a list, or its JSON text) as a list; None for none; BadRow if
    the value is neither."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow("tools: not a JSON list of function schemas") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow(f"tools: {_kind(value)}, not a list of function schemas")
    return value


def jinja_renderer(template: str, variables: dict[str, str] | None = None) -> Any:
    """render(messages, tools=None, add_generation_prompt=False) -> text, with jinja2 alone (the
    login node has no transformers): the environment of transformers' apply_chat_template
    (trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson; the `{% generation %}`
    tag renders its body). ImportError without jinja2."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(conv: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        return compiled.render(messages=conv, tools=tools, add_generation_prompt=add_generation_prompt,
                               **(variables or {}))
    return render

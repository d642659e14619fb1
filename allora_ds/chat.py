"""Conversations as datasets hold them -> the plain messages a chat template renders, and their loss.

Two shapes are read (field and role names configurable, as LLaMA-Factory's dataset_info tags and
axolotl's message mappings allow):

    chat      messages: [{role, content}]; content a string or a list of parts
              ([{"type": "text", "text": ...}], as OpenAI-style exports hold it); assistant turns may
              carry tool_calls, tool turns answer them
    sharegpt  conversations: [{from, value}] with from human/gpt/system/tool/function_call/observation

Everything becomes ``{"role", "content"}`` messages with string content (text parts joined in
order), ``tool_calls`` with their arguments as mappings, and one flag per message: whether its
tokens carry loss. Anything that would otherwise be rendered wrong or trained on silently is
refused with the message (and part) index: non-text parts, null or missing content, unknown
roles, tool calls a template cannot render.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")
# The role names of common datasets (ShareGPT, LLaMA-Factory, OpenAI, Llama-3.1's ipython).
# "function_call" is LLaMA-Factory's assistant turn that calls a tool: its value is the call as JSON.
DEFAULT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "bot": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
                 "observation": "tool", "ipython": "tool", "function_call": "assistant"}
TOOL_CALL_ROLE = "function_call"
SHAPES = {"chat": {"messages": "messages", "role": "role", "content": "content"},
          "sharegpt": {"messages": "conversations", "role": "from", "content": "value"}}


class ConversationError(ValueError):
    """A conversation that cannot be trained on as it is; the message says where in the row."""


@dataclass(frozen=True)
class Template:
    """What a tokenizer's chat template can render, read from its source."""

    tool_turns: bool
    tool_calls: bool

    @classmethod
    def of(cls, tokenizer) -> Template:
        text = tokenizer.chat_template or ""
        if isinstance(text, dict):  # several named templates: the default one renders training data
            text = text.get("default", "")
        return cls(tool_turns=bool(re.search(r"""['"](tool|ipython)['"]""", text)), tool_calls="tool_calls" in text)


def field_names(fmt: str, fields: dict) -> dict:
    """The data's names for messages/role/content (and the per-message train flag) of ``fmt``."""
    return {**SHAPES[fmt], "train": None, **fields}


def normalize(turns, fmt: str, fields: dict, roles: dict, template: Template, train_on: str):
    """``(messages, trained)`` from one row's list of turns; raises ``ConversationError``."""
    names = field_names(fmt, fields)
    role_map = {**DEFAULT_ROLES, **roles}
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"{names['messages']!r} must be a non-empty list of turns, got "
                                f"{type(turns).__name__ if turns != [] else 'an empty list'}")
    messages, flags = [], []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ConversationError(f"message {i} must be an object with {names['role']!r} and {names['content']!r}, "
                                    f"got {type(turn).__name__}")
        msg = _message(turn, i, names, role_map, template)
        flag = turn.get(names["train"]) if names["train"] else None
        if flag is not None and not isinstance(flag, bool):
            raise ConversationError(f"message {i}: field {names['train']!r} must be true or false, got {flag!r}")
        if flag and msg["role"] != "assistant":
            raise ConversationError(f"message {i} ({msg['role']}): field {names['train']!r} is true, but only "
                                    "assistant turns carry loss")
        messages.append(msg)
        flags.append(flag)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ConversationError("the conversation has no assistant turn to learn from")
    chosen = assistant[-1:] if train_on == "last_assistant" else assistant
    trained = [i in chosen and flags[i] is not False for i in range(len(messages))]
    if not any(trained):
        raise ConversationError(f"no assistant turn is left to learn from: field {names['train']!r} excludes "
                                + ("the last one (data.train_on=last_assistant)" if train_on == "last_assistant"
                                   else "every one"))
    return messages, trained


def _message(turn: dict, i: int, names: dict, role_map: dict, template: Template) -> dict:
    raw_role = turn.get(names["role"])
    if not isinstance(raw_role, str) or not raw_role:
        hint = " (ShareGPT turns? set data.format: sharegpt)" if "from" in turn and names["role"] != "from" else ""
        raise ConversationError(f"message {i} has no {names['role']!r} (a string){hint}")
    role = role_map.get(raw_role)
    if role not in ROLES:
        known = sorted(k for k, v in role_map.items() if v in ROLES)
        raise ConversationError(f"message {i}: unknown role {raw_role!r} (known: {', '.join(known)}; "
                                "map others with data.roles)")
    if role == "tool" and not template.tool_turns:
        raise ConversationError(f"message {i}: a {raw_role!r} turn, but the tokenizer's chat template renders no "
                                "tool turns")
    msg = {"role": role}
    content = turn.get(names["content"])
    calls = turn.get("tool_calls")
    if raw_role == TOOL_CALL_ROLE:  # LLaMA-Factory: the call itself is the content, as JSON
        calls, content = _json(content, f"message {i}: a {raw_role!r} turn"), None
        calls = calls if isinstance(calls, list) else [calls]
    if calls is not None:
        if role != "assistant":
            raise ConversationError(f"message {i} ({role}) has tool_calls; only assistant turns make them")
        if not template.tool_calls:
            raise ConversationError(f"message {i} has tool_calls, but the tokenizer's chat template does not "
                                    "render tool calls")
        msg["tool_calls"] = [_tool_call(c, i, k) for k, c in enumerate(calls if isinstance(calls, list) else [calls], 1)]
    if content is None:
        if calls is None:
            raise ConversationError(f"message {i} ({role}) has no {names['content']!r} (null or missing)")
        content = ""  # a pure tool call: the call is what the turn says
    msg["content"] = _text(content, i, names["content"])
    for key in ("tool_call_id", "name"):
        if isinstance(turn.get(key), str) and role == "tool":
            msg[key] = turn[key]
    return msg


def _text(content, i: int, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError(f"message {i}: {field!r} must be a string or a list of parts, got "
                                f"{type(content).__name__}")
    out = []
    for k, part in enumerate(content, 1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"has type {kind!r}" if kind else "has no 'type'" if isinstance(part, dict) else \
                f"is a {type(part).__name__}"
            raise ConversationError(f"message {i}, part {k} {what}: only text parts can be trained on")
        if not isinstance(part.get("text"), str):
            raise ConversationError(f"message {i}, part {k}: a text part needs 'text' (a string)")
        out.append(part["text"])
    if not out:
        raise ConversationError(f"message {i}: {field!r} is an empty list of parts")
    return "".join(out)


def _json(value, what: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConversationError(f"{what} must hold JSON ({e.msg} at column {e.colno})") from None


def _tool_call(call, i: int, k: int) -> dict:
    """A tool call as templates read it: {"type": "function", "function": {"name", "arguments": {...}}}."""
    where = f"message {i}, tool call {k}"
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ConversationError(f"{where} needs a function name ({{\"function\": {{\"name\": ..., \"arguments\": ...}}}})")
    args = _json(fn.get("arguments", fn.get("parameters", {})), f"{where}: arguments")
    if not isinstance(args, dict):
        raise ConversationError(f"{where}: arguments must be an object, got {type(args).__name__}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out

"""Prompt templates: the GGUF's own Jinja chat template by default, or the
template a model was created with.

Ollama's Modelfile templates are Go templates. The subset that single-turn and
legacy chat templates use is supported here: `{{ .System }}`, `{{ .Prompt }}`,
`{{ .Response }}`, `{{ if .X }}…{{ else }}…{{ end }}` and the `{{-`/`-}}` trim
markers. Anything else (`range`, functions) is refused with a clear error rather
than rendered wrongly. A template containing Jinja syntax is rendered as Jinja.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import BadRequestError
from ..models.store import ModelRecord
from .base import InferenceRequest

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _is_jinja(template: str) -> bool:
    return "{%" in template or ("messages" in template and "{{ ." not in template)


def _parse(template: str) -> list[Any]:
    """Tokens: str literals and (kind, arg) actions, with trim markers applied."""
    out: list[Any] = []
    pos = 0
    for m in _ACTION.finditer(template):
        literal = template[pos : m.start()]
        if m.group(1) == "-":
            literal = literal.rstrip()
        if out and isinstance(out[-1], tuple) and out[-1][2]:
            literal = literal.lstrip()
        if literal:
            out.append(literal)
        body = m.group(2)
        trim_right = m.group(3) == "-"
        if re.fullmatch(r"\.(System|Prompt|Response)", body):
            out.append(("var", body[1:], trim_right))
        elif re.fullmatch(r"if\s+\.(System|Prompt|Response)", body):
            out.append(("if", body.split(".")[1], trim_right))
        elif body in ("else", "end"):
            out.append((body, "", trim_right))
        else:
            raise BadRequestError(f"template uses an unsupported construct: {{{{ {body} }}}}")
        pos = m.end()
    tail = template[pos:]
    if out and isinstance(out[-1], tuple) and out[-1][2]:
        tail = tail.lstrip()
    if tail:
        out.append(tail)
    return out


def render_go(template: str, values: dict[str, str]) -> str:
    tokens = _parse(template)
    out: list[str] = []
    stack: list[bool] = []  # whether the current branch is emitting

    def active() -> bool:
        return all(stack)

    for tok in tokens:
        if isinstance(tok, str):
            if active():
                out.append(tok)
            continue
        kind, arg, _ = tok
        if kind == "var":
            if active():
                out.append(values.get(arg, ""))
        elif kind == "if":
            stack.append(bool(values.get(arg)))
        elif kind == "else":
            if not stack:
                raise BadRequestError("template has {{ else }} without {{ if }}")
            stack[-1] = not stack[-1]
        elif kind == "end":
            if not stack:
                raise BadRequestError("template has {{ end }} without {{ if }}")
            stack.pop()
    if stack:
        raise BadRequestError("template has an {{ if }} without {{ end }}")
    return "".join(out)


def _messages(record: ModelRecord, req: InferenceRequest) -> list[dict[str, Any]]:
    if req.kind == "chat":
        msgs = [
            {"role": m.get("role", "user"), "content": m.get("content") or ""} for m in req.messages
        ]
        system = req.system or record.system
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    msgs = []
    system = req.system if req.system is not None else record.system
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": req.prompt})
    return msgs


def _token_text(llama: Any, token: int) -> str:
    if token < 0:
        return ""
    text: str = llama._model.token_get_text(token)
    return text


def render_prompt(llama: Any, record: ModelRecord, req: InferenceRequest) -> tuple[str, list[str], bool]:
    """(prompt text, extra stop strings, whether to add BOS when tokenising)."""
    if req.kind == "generate" and req.raw:
        return req.prompt, [], True
    template = req.template or record.template
    msgs = _messages(record, req)
    if template and not _is_jinja(template):
        system = next((m["content"] for m in msgs if m["role"] == "system"), "")
        turns = [m for m in msgs if m["role"] != "system"]
        parts: list[str] = []
        pending_user: str | None = None
        for m in turns:
            if m["role"] == "user":
                if pending_user is not None:
                    parts.append(render_go(template, {"System": system if not parts else "", "Prompt": pending_user, "Response": ""}))
                pending_user = m["content"]
            elif m["role"] == "assistant":
                parts.append(
                    render_go(template, {"System": system if not parts else "", "Prompt": pending_user or "", "Response": m["content"]})
                )
                pending_user = None
        if pending_user is not None or not parts:
            parts.append(render_go(template, {"System": system if not parts else "", "Prompt": pending_user or "", "Response": ""}))
        return "".join(parts), [], True
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    jinja = template or llama.metadata.get("tokenizer.chat_template")
    if not jinja:
        raise BadRequestError(
            f"model '{record.name.short}' has no chat template; "
            "create it with a template or use raw mode"
        )
    eos = llama.token_eos()
    formatter = Jinja2ChatFormatter(
        template=jinja,
        eos_token=_token_text(llama, eos),
        bos_token=_token_text(llama, llama.token_bos()),
        stop_token_ids=[eos],
    )
    try:
        result = formatter(messages=msgs)  # type: ignore[arg-type]
    except Exception as e:
        raise BadRequestError(f"failed to render the chat template: {e}") from e
    stops = [s for s in (result.stop if isinstance(result.stop, list) else [result.stop]) if s]
    return result.prompt, stops, not result.added_special

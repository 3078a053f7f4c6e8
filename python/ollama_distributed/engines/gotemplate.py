"""Go's text/template language, as Ollama's model templates use it.

Written from the language's documentation, not from Go's code: actions with
`{{-`/`-}}` trim markers and comments, pipelines (`a | b`), parenthesised
sub-pipelines, fields (`.A.B`, `$x.A`, `(pipe).A`), variables (`$x := ...`,
`$x = ...`, `$` for the data), `if`/`else if`/`with`/`else with`/`range`
(with `$i, $m :=`, over lists, maps in key order and integers) with `break`
and `continue`, and the built-in functions (`and`, `or`, `not`, `eq`, `ne`,
`lt`, `le`, `gt`, `ge`, `len`, `index`, `slice`, `print`, `printf`,
`println`, `html`, `js`, `urlquery`) plus the ones a caller adds.

Data is plain Python: a dict is a Go map (a missing key is the zero value),
a `Struct` is a Go struct (an unknown field is an error), and any value with a
`go_string()` method prints through it, like a Go Stringer. `define`,
`template` and `block` are refused: Ollama's templates do not use them.
"""

from __future__ import annotations

import functools
import html as _html
import json
import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


class TemplateError(Exception):
    """A template that does not parse, or fails while it runs."""


class Struct:
    """A Go struct: named fields, printed as `{v1 v2}`, or through its JSON
    when `stringer` is set (Ollama's tool types have String() methods).

    `tags` are its JSON field tags: field -> (key, omitempty); without them
    encoding/json uses the field names."""

    __slots__ = ("fields", "stringer", "tags", "type_name")

    def __init__(self, type_name: str, fields: dict[str, Any],
                 tags: dict[str, tuple[str, bool]] | None = None, stringer: bool = False) -> None:
        self.type_name = type_name
        self.fields = fields
        self.tags = tags
        self.stringer = stringer

    def get(self, name: str) -> Any:
        if name not in self.fields:
            raise TemplateError(f"can't evaluate field {name} in type {self.type_name}")
        return self.fields[name]

    def to_json(self) -> Any:
        out = _Ordered()
        for name, value in self.fields.items():
            key, omitempty = (self.tags or {}).get(name, (name, False))
            if omitempty and not truth(value) and not isinstance(value, Struct):
                continue
            out[key] = to_json(value)
        return out

    def go_string(self) -> str:
        if self.stringer:
            return go_json(self)
        return "{" + " ".join(_fmt(x) for x in self.fields.values()) + "}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Struct) and other.fields == self.fields

    __hash__ = None  # type: ignore[assignment]


class _Ordered(dict[str, Any]):
    """A JSON object whose keys keep their order (a struct), unlike a Go map's."""


class JSONList(list[Any]):
    """A Go slice type whose String() is its JSON (Ollama's Tools)."""

    def go_string(self) -> str:
        return go_json(self)


class JSONMap(dict[str, Any]):
    """A Go map type whose String() is its JSON (tool call arguments, properties)."""

    def go_string(self) -> str:
        return go_json(self) if self else "{}"


def to_json(v: Any) -> Any:
    """A value as encoding/json sees it (a type's own `to_json` first)."""
    if hasattr(v, "to_json"):
        return v.to_json()
    if isinstance(v, _Ordered):
        return _Ordered((k, to_json(x)) for k, x in v.items())
    if isinstance(v, dict):
        return {str(k): to_json(v[k]) for k in sorted(v, key=str)}  # Go sorts map keys
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    return v


def go_json(v: Any) -> str:
    """encoding/json.Marshal: compact, map keys sorted, <>& escaped, 1.0 as 1."""
    return _json_text(to_json(v))


def _json_text(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ",".join(_json_str(k) + ":" + _json_text(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_json_text(x) for x in v) + "]"
    if isinstance(v, str):
        return _json_str(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise TemplateError(f"json: unsupported value: {v}")
        if v == int(v) and abs(v) < 1e21:
            return str(int(v))
        r = repr(v)
        if "e" in r:  # Go writes 1e-07, not 1e-7
            m, e = r.split("e")
            r = f"{m}e{e[0] if e[0] in '+-' else '+'}{e.lstrip('+-').zfill(2)}"
        return r
    return _json_str(str(v))


def _json_str(s: str) -> str:
    return (json.dumps(s, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


# ---- printing as Go's fmt %v does -----------------------------------------------


def go_float(x: float) -> str:
    """fmt's %v for a float64 (%g, shortest): 1e+06, 123456.5, 1e-05."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1, x) < 0 else "0"
    d = Decimal(repr(abs(x))).normalize()  # repr is the shortest round-trip form
    _, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    point = len(digits) - 1 + exp  # decimal exponent of the first digit
    if point < -4 or point >= 6:  # strconv's shortest %g switches to %e at 6
        rest = "".join(map(str, digits[1:]))
        s = f"{digits[0]}{'.' + rest if rest else ''}e{'-' if point < 0 else '+'}{abs(point):02d}"
    else:
        s = format(d, "f")
    return ("-" if x < 0 else "") + s


def go_str(v: Any) -> str:
    """A value as `{{ . }}` prints it."""
    if v is None:
        return "<no value>"
    return _fmt(v, top=True)


def _fmt(v: Any, top: bool = False) -> str:
    if hasattr(v, "go_string"):
        return str(v.go_string())
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return go_float(v)
    if v is None:
        return "<nil>"
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: _sort_key(kv[0]))
        return "map[" + " ".join(f"{_fmt(k)}:{_fmt(x)}" for k, x in items) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _sort_key(k: Any) -> tuple[int, Any]:
    if isinstance(k, (int, float)) and not isinstance(k, bool):
        return (0, k)
    return (1, str(k))


def truth(v: Any) -> bool:
    """Go's notion of empty: false, 0, nil, and empty strings, lists and maps."""
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


# ---- lexing -----------------------------------------------------------------------

_SPACE = " \t\r\n"
_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<raw>`[^`]*`)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\\n]|\\.[^']*)')
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?))
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.X,
)
_FIELD_SUFFIX = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass
class _Tok:
    kind: str
    value: str
    fields: list[str] = field(default_factory=list)  # a field chain right after this token


def _lex_action(body: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise TemplateError(f"unexpected {body[pos]!r} in action {{{{{body}}}}}")
        kind = m.lastgroup or ""
        pos = m.end()
        if kind == "ws":
            continue
        tok = _Tok(kind, m.group())
        if kind in ("var", "rparen"):
            f = _FIELD_SUFFIX.match(body, pos)
            if f is not None:
                tok.fields = f.group()[1:].split(".")
                pos = f.end()
        toks.append(tok)
    return toks


def _unquote(s: str) -> str:
    if s.startswith("`"):
        return s[1:-1]
    body = s[1:-1]
    out: list[str] = []
    i = 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a",
              "b": "\b", "f": "\f", "v": "\v"}
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1] if i + 1 < len(body) else ""
        if e in simple:
            out.append(simple[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(body[i + 2:i + 2 + n], 16)))
            i += 2 + n
        elif e.isdigit():
            out.append(chr(int(body[i + 1:i + 4], 8)))
            i += 4
        else:
            raise TemplateError(f"invalid escape in string {s}")
    return "".join(out)


# ---- the tree -----------------------------------------------------------------------


@dataclass
class Text:
    text: str


@dataclass
class Field:
    names: list[str]  # .A.B on dot


@dataclass
class Variable:
    name: str  # "$" or "$x"
    names: list[str]  # fields after it


@dataclass
class Chain:
    node: Any  # a Pipe in parentheses
    names: list[str]


@dataclass
class Ident:
    name: str  # a function


@dataclass
class Literal:
    value: Any


@dataclass
class Dot:
    pass


@dataclass
class Command:
    args: list[Any]


@dataclass
class Pipe:
    decl: list[str]
    assign: bool  # `=` rather than `:=`
    cmds: list[Command]


@dataclass
class Action:
    pipe: Pipe


@dataclass
class Branch:
    kind: str  # "if" | "with" | "range"
    pipe: Pipe
    body: list[Any]
    else_body: list[Any] | None = None


@dataclass
class Break:
    pass


@dataclass
class Continue:
    pass


_COMMENT = re.compile(r"/\*.*?\*/", re.S)


def _items(src: str) -> list[Any]:
    """Text and action items; trim markers applied and empty texts dropped, as Go's lexer does."""
    items: list[Any] = []
    pos = 0
    trim_next = False  # the last action ended with ` -}}`
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        inner = start + 2
        if start >= 0 and src[inner:inner + 1] == "-" and src[inner + 1:inner + 2] in tuple(_SPACE):
            text = text.rstrip(_SPACE)  # `{{- ` trims the text before it
            inner += 2
        if text:
            items.append(Text(text))
        if start < 0:
            return items
        if src.startswith("/*", inner):
            close = src.find("*/", inner + 2)
            if close < 0:
                raise TemplateError("unclosed comment")
            after = close + 2
            trim_next = src[after:after + 1] in tuple(_SPACE) and src.startswith("-}}", after + 1)
            if trim_next:
                after += 1 + 3
            elif src.startswith("}}", after):
                after += 2
            else:
                raise TemplateError("comment ends before closing delimiter")
            pos = after
            continue
        end = _find_close(src, inner)
        if end < 0:
            raise TemplateError("unclosed action")
        body = src[inner:end]
        trim_next = len(body) >= 2 and body.endswith("-") and body[-2] in _SPACE
        if trim_next:
            body = body[:-1]
        items.append(_lex_action(body))
        pos = end + 2


def _find_close(src: str, pos: int) -> int:
    """Index of the `}}` closing the action at pos, skipping quoted strings."""
    i = pos
    while i < len(src):
        c = src[i]
        if c == '"' or c == "'":
            j = i + 1
            while j < len(src) and src[j] != c:
                if src[j] == "\\":
                    j += 1
                elif src[j] == "\n":
                    raise TemplateError("unterminated quoted string")
                j += 1
            i = j + 1
            continue
        if c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise TemplateError("unterminated raw quoted string")
            i = j + 1
            continue
        if src.startswith("}}", i):
            return i
        i += 1
    return -1


class _Parser:
    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.i = 0

    def parse(self) -> list[Any]:
        body, stop = self.list_until(())
        if stop is not None:
            raise TemplateError(f"unexpected {{{{{stop[0].value}}}}}")
        return body

    def list_until(self, stops: tuple[str, ...]) -> tuple[list[Any], list[_Tok] | None]:
        out: list[Any] = []
        while self.i < len(self.items):
            item = self.items[self.i]
            self.i += 1
            if isinstance(item, Text):
                out.append(item)
                continue
            toks: list[_Tok] = item
            if not toks:
                raise TemplateError("missing value for command")
            head = toks[0]
            word = head.value if head.kind == "ident" else ""
            if word in stops:
                return out, toks
            if word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{{word}}}}}")
            if word in ("if", "with", "range"):
                out.append(self.branch(word, toks[1:]))
            elif word in ("break", "continue"):
                if len(toks) != 1:
                    raise TemplateError(f"unexpected token after {word}")
                out.append(Break() if word == "break" else Continue())
            elif word in ("define", "template", "block"):
                raise TemplateError(f"{{{{{word}}}}} is not supported in model templates")
            else:
                out.append(Action(_PipeParser(toks).pipe(allow_decl=True)))
        if stops:
            raise TemplateError("unexpected EOF: missing {{end}}")
        return out, None

    def branch(self, kind: str, toks: list[_Tok]) -> Branch:
        pipe = _PipeParser(toks).pipe(allow_decl=True)
        body, stop = self.list_until(("end", "else"))
        node = Branch(kind, pipe, body)
        assert stop is not None
        if stop[0].value == "else":
            rest = stop[1:]
            if rest and rest[0].kind == "ident" and rest[0].value in ("if", "with"):
                # `else if`/`else with`: a nested branch that shares this one's {{end}}
                node.else_body = [self.branch(rest[0].value, rest[1:])]
                return node
            if rest:
                raise TemplateError("unexpected tokens after {{else}}")
            node.else_body, stop = self.list_until(("end",))
            assert stop is not None
        if len(stop) != 1:
            raise TemplateError("unexpected tokens after {{end}}")
        return node


class _PipeParser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def pipe(self, allow_decl: bool, closing: str = "") -> Pipe:
        decl: list[str] = []
        assign = False
        if allow_decl:
            j = self.i
            names: list[str] = []
            while j < len(self.toks) and self.toks[j].kind == "var" and not self.toks[j].fields:
                names.append(self.toks[j].value)
                j += 1
                if j < len(self.toks) and self.toks[j].kind == "comma" and len(names) == 1:
                    j += 1
                    continue
                break
            if names and j < len(self.toks) and self.toks[j].kind in ("decl", "assign"):
                decl = names
                assign = self.toks[j].kind == "assign"
                self.i = j + 1
        cmds: list[Command] = []
        while True:
            args: list[Any] = []
            while (t := self.peek()) is not None and t.kind not in ("pipe", "rparen"):
                args.append(self.operand())
            if not args:
                raise TemplateError("missing value for command")
            cmds.append(Command(args))
            t = self.peek()
            if t is None:
                if closing:
                    raise TemplateError("unclosed left paren")
                break
            if t.kind == "rparen":
                if not closing:
                    raise TemplateError("unexpected right paren")
                break
            self.i += 1  # "|"
        return Pipe(decl, assign, cmds)

    def operand(self) -> Any:
        t = self.toks[self.i]
        self.i += 1
        k = t.kind
        if k == "field":
            return Field(t.value[1:].split("."))
        if k == "dot":
            return Dot()
        if k == "var":
            return Variable(t.value, t.fields)
        if k in ("str", "raw"):
            return Literal(_unquote(t.value))
        if k == "char":
            return Literal(ord(_unquote('"' + t.value[1:-1] + '"')))
        if k == "num":
            return Literal(_number(t.value))
        if k == "lparen":
            inner = self.pipe(allow_decl=True, closing=")")
            close = self.toks[self.i]
            self.i += 1
            if close.fields:
                return Chain(inner, close.fields)
            return inner
        if k == "ident":
            if t.value in ("true", "false"):
                return Literal(t.value == "true")
            if t.value == "nil":
                return Literal(None)
            return Ident(t.value)
        raise TemplateError(f"unexpected {t.value!r} in operand")


def _number(s: str) -> int | float:
    s = s.replace("_", "")
    try:
        return int(s, 0)
    except ValueError:
        return float(s)


# ---- running ---------------------------------------------------------------------------


# A template comes with a model from a registry: bound what one run may produce,
# so a hostile one cannot exhaust memory (a real prompt is far below these).
MAX_OUTPUT = 16 << 20  # characters
MAX_RANGE = 1 << 20  # iterations of one range


class _Out(list[str]):
    size = 0

    def add(self, s: str) -> None:
        self.size += len(s)
        if self.size > MAX_OUTPUT:
            raise TemplateError(f"template output exceeds {MAX_OUTPUT} characters")
        self.append(s)


class _BreakSignal(Exception):
    pass


class _ContinueSignal(Exception):
    pass


_LAZY = ("and", "or")


class Template:
    """A parsed template; `execute(data)` renders it."""

    def __init__(self, source: str, funcs: dict[str, Callable[..., Any]] | None = None) -> None:
        self.source = source
        self.funcs: dict[str, Callable[..., Any]] = {**BUILTINS, **(funcs or {})}
        self.root: list[Any] = _Parser(_items(source)).parse()
        self._check_funcs(self.root)
        _check_vars(self.root, ["$"])

    def _check_funcs(self, nodes: list[Any]) -> None:
        for n in walk(nodes):
            if isinstance(n, Ident) and n.name not in self.funcs and n.name not in _LAZY:
                raise TemplateError(f'function "{n.name}" not defined')

    def execute(self, data: Any, root: list[Any] | None = None) -> str:
        out = _Out()
        vars_: list[tuple[str, Any]] = [("$", data)]
        try:
            self._list(self.root if root is None else root, data, vars_, out)
        except (_BreakSignal, _ContinueSignal):
            raise TemplateError("break or continue outside range") from None
        except RecursionError:
            raise TemplateError("template nesting too deep") from None
        return "".join(out)

    # statements

    def _list(self, nodes: list[Any], dot: Any, vars_: list[tuple[str, Any]], out: _Out) -> None:
        for n in nodes:
            if isinstance(n, Text):
                out.add(n.text)
            elif isinstance(n, Action):
                v = self._pipe(n.pipe, dot, vars_)
                if not n.pipe.decl:
                    out.add(go_str(v))
            elif isinstance(n, Branch):
                self._branch(n, dot, vars_, out)
            elif isinstance(n, Break):
                raise _BreakSignal()
            elif isinstance(n, Continue):
                raise _ContinueSignal()

    def _branch(self, n: Branch, dot: Any, vars_: list[tuple[str, Any]], out: _Out) -> None:
        mark = len(vars_)
        try:
            if n.kind == "range":
                self._range(n, dot, vars_, out)
                return
            v = self._pipe(n.pipe, dot, vars_)
            if truth(v):
                self._list(n.body, v if n.kind == "with" else dot, vars_, out)
            elif n.else_body is not None:
                self._list(n.else_body, dot, vars_, out)
        finally:
            del vars_[mark:]

    def _range(self, n: Branch, dot: Any, vars_: list[tuple[str, Any]], out: _Out) -> None:
        v = self._pipe(Pipe([], False, n.pipe.cmds), dot, vars_)
        if isinstance(v, dict):
            pairs: list[tuple[Any, Any]] = [(k, v[k]) for k in sorted(v, key=_sort_key)]
        elif isinstance(v, (list, tuple)):
            pairs = list(enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            if n.pipe.decl and len(n.pipe.decl) > 1:
                raise TemplateError("can't use a second variable ranging over an integer")
            if v > MAX_RANGE:
                raise TemplateError(f"range over {v}: more than {MAX_RANGE} iterations")
            pairs = [(i, i) for i in range(v)]
        elif v is None:
            pairs = []
        elif isinstance(v, str):
            raise TemplateError("range can't iterate over a string")
        else:
            raise TemplateError(f"range can't iterate over {go_str(v)}")
        if not pairs:
            if n.else_body is not None:
                self._list(n.else_body, dot, vars_, out)
            return
        mark = len(vars_)
        for key, elem in pairs:
            if len(n.pipe.decl) == 1:
                vars_.append((n.pipe.decl[0], elem))
            elif len(n.pipe.decl) == 2:
                vars_.append((n.pipe.decl[0], key))
                vars_.append((n.pipe.decl[1], elem))
            try:
                self._list(n.body, elem, vars_, out)
            except _BreakSignal:
                break
            except _ContinueSignal:
                pass
            finally:
                del vars_[mark:]

    # expressions

    def _pipe(self, pipe: Pipe, dot: Any, vars_: list[tuple[str, Any]]) -> Any:
        value: Any = None
        final = False
        for cmd in pipe.cmds:
            value = self._command(cmd, dot, vars_, value, final)
            final = True
        if len(pipe.decl) > 1:
            raise TemplateError("too many declarations in command")
        for name in pipe.decl:
            if pipe.assign:
                self._set(vars_, name, value)
            else:
                vars_.append((name, value))
        return value

    def _set(self, vars_: list[tuple[str, Any]], name: str, value: Any) -> None:
        for i in range(len(vars_) - 1, -1, -1):
            if vars_[i][0] == name:
                vars_[i] = (name, value)
                return
        raise TemplateError(f"undefined variable: {name}")

    def _var(self, vars_: list[tuple[str, Any]], name: str) -> Any:
        for n, v in reversed(vars_):
            if n == name:
                return v
        raise TemplateError(f"undefined variable: {name}")

    def _command(self, cmd: Command, dot: Any, vars_: list[tuple[str, Any]], prev: Any, has_prev: bool) -> Any:
        first = cmd.args[0]
        if isinstance(first, Ident):
            args = cmd.args[1:]
            if first.name in _LAZY:
                return self._lazy(first.name, args, dot, vars_, prev, has_prev)
            values = [self._arg(a, dot, vars_) for a in args]
            if has_prev:
                values.append(prev)
            try:
                return self.funcs[first.name](*values)
            except TemplateError:
                raise
            except Exception as e:
                raise TemplateError(f"error calling {first.name}: {e}") from None
        if len(cmd.args) > 1 or has_prev:
            raise TemplateError(f"can't give argument to non-function {_describe(first)}")
        return self._arg(first, dot, vars_)

    def _lazy(self, name: str, args: list[Any], dot: Any, vars_: list[tuple[str, Any]],
              prev: Any, has_prev: bool) -> Any:
        thunks: list[Callable[[], Any]] = [functools.partial(self._arg, a, dot, vars_) for a in args]
        if has_prev:
            thunks.append(lambda: prev)
        if not thunks:
            raise TemplateError(f"wrong number of args for {name}: want at least 1 got 0")
        v: Any = None
        for t in thunks:
            v = t()
            if truth(v) != (name == "and"):
                return v
        return v

    def _arg(self, a: Any, dot: Any, vars_: list[tuple[str, Any]]) -> Any:
        if isinstance(a, Literal):
            return a.value
        if isinstance(a, Dot):
            return dot
        if isinstance(a, Field):
            return _fields(dot, a.names)
        if isinstance(a, Variable):
            return _fields(self._var(vars_, a.name), a.names)
        if isinstance(a, Pipe):
            return self._pipe(a, dot, vars_)
        if isinstance(a, Chain):
            return _fields(self._pipe(a.node, dot, vars_), a.names)
        if isinstance(a, Ident):
            if a.name in _LAZY:
                raise TemplateError(f"wrong number of args for {a.name}: want at least 1 got 0")
            return self.funcs[a.name]()
        raise TemplateError(f"can't evaluate {a!r}")


def _check_vars(nodes: list[Any], scope: list[str]) -> None:
    """Variables are declared before use, in the scope of their {{end}}, as Go's parser requires."""

    def pipe(p: Pipe, inner: list[str]) -> None:
        for c in p.cmds:
            for a in c.args:
                if isinstance(a, Variable) and a.name not in inner:
                    raise TemplateError(f"undefined variable: {a.name}")
                if isinstance(a, Pipe):
                    pipe(a, inner)
                    inner.extend(a.decl if not a.assign else [])
                elif isinstance(a, Chain):
                    pipe(a.node, inner)
        if p.assign and p.decl[0] not in inner:
            raise TemplateError(f"undefined variable: {p.decl[0]}")

    for n in nodes:
        if isinstance(n, Action):
            pipe(n.pipe, scope)
            if not n.pipe.assign:
                scope.extend(n.pipe.decl)
        elif isinstance(n, Branch):
            inner = list(scope)
            pipe(n.pipe, inner)
            if not n.pipe.assign:
                inner.extend(n.pipe.decl)
            _check_vars(n.body, list(inner))
            if n.else_body is not None:
                _check_vars(n.else_body, list(inner))


def _describe(a: Any) -> str:
    if isinstance(a, Field):
        return "." + ".".join(a.names)
    if isinstance(a, Variable):
        return a.name
    return type(a).__name__.lower()


def _fields(v: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(v, Struct):
            v = v.get(name)
        elif isinstance(v, dict):
            v = v.get(name)  # a Go map: a missing key is the zero value
        elif v is None:
            raise TemplateError(f"nil pointer evaluating interface {{}}.{name}")
        else:
            raise TemplateError(f"can't evaluate field {name} in type {type(v).__name__}")
    return v


def walk(nodes: list[Any]) -> Any:
    """Every node of a tree, depth first, in source order."""
    for n in nodes:
        yield n
        if isinstance(n, Action):
            yield from _walk_pipe(n.pipe)
        elif isinstance(n, Branch):
            yield from _walk_pipe(n.pipe)
            yield from walk(n.body)
            if n.else_body is not None:
                yield from walk(n.else_body)


def _walk_pipe(p: Pipe) -> Any:
    yield p
    for c in p.cmds:
        for a in c.args:
            yield a
            if isinstance(a, Pipe):
                yield from _walk_pipe(a)
            elif isinstance(a, Chain):
                yield from _walk_pipe(a.node)


# ---- built-in functions ------------------------------------------------------------------


def _basic(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TemplateError(f"incompatible type for comparison: {go_str(v)}")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "nil"


def _eq(a: Any, *bs: Any) -> bool:
    if not bs:
        raise TemplateError("missing argument for comparison")
    _basic(a)
    for b in bs:
        _basic(b)
        if a is None or b is None:
            if a is b:
                return True
            continue
        if _kind(a) != _kind(b):
            raise TemplateError("incompatible types for comparison")
        if a == b:
            return True
    return False


def _ordered(a: Any, b: Any) -> tuple[Any, Any]:
    _basic(a)
    _basic(b)
    if _kind(a) != _kind(b) or _kind(a) in ("bool", "nil"):
        raise TemplateError("invalid type for comparison")
    return a, b


def _len(v: Any) -> int:
    if isinstance(v, str):
        return len(v.encode("utf-8"))  # Go counts bytes
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    raise TemplateError(f"len of type {type(v).__name__}")


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple, str)):
            seq = v.encode("utf-8") if isinstance(v, str) else v
            if not isinstance(k, int) or isinstance(k, bool):
                raise TemplateError("cannot index slice/array with non-integer")
            if not 0 <= k < len(seq):
                raise TemplateError(f"index out of range: {k}")
            v = seq[k]
        elif v is None:
            raise TemplateError("index of untyped nil")
        else:
            raise TemplateError(f"can't index item of type {type(v).__name__}")
    return v


def _slice(v: Any, *idx: Any) -> Any:
    if len(idx) > 3:
        raise TemplateError("too many slice indexes")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise TemplateError("cannot slice with non-integer index")
    if isinstance(v, str):
        if len(idx) == 3:
            raise TemplateError("cannot 3-index slice a string")
        raw = v.encode("utf-8")
        lo = idx[0] if idx else 0
        hi = idx[1] if len(idx) > 1 else len(raw)
        if not 0 <= lo <= hi <= len(raw):
            raise TemplateError(f"index out of range: {lo}:{hi}")
        return raw[lo:hi].decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        lo = idx[0] if idx else 0
        hi = idx[1] if len(idx) > 1 else len(v)
        if not 0 <= lo <= hi <= len(v):
            raise TemplateError(f"index out of range: {lo}:{hi}")
        return list(v[lo:hi])
    raise TemplateError(f"can't slice item of type {type(v).__name__}")


def _sprint(*args: Any) -> str:
    out: list[str] = []
    for i, a in enumerate(args):
        if i > 0 and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(_fmt(a))
    return "".join(out)


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([a-zA-Z%])")


def _sprintf(fmt: str, *args: Any) -> str:
    """fmt.Sprintf for the verbs templates use: %s %v %d %q %f %g %e %t %x %c %%."""
    it = iter(args)
    missing = object()

    def sub(m: re.Match[str]) -> str:
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            return "%"
        a = next(it, missing)
        if a is missing:
            return f"%!{verb}(MISSING)"
        if verb in "sv":
            s = _fmt(a)
        elif verb == "q":
            s = '"' + _fmt(a).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        elif verb == "d" and isinstance(a, int):
            s = str(a)
        elif verb in "feg" and isinstance(a, (int, float)):
            s = format(float(a), f".{prec or 6}{verb}") if verb != "g" else go_float(float(a))
        elif verb == "t" and isinstance(a, bool):
            s = "true" if a else "false"
        elif verb == "x" and isinstance(a, (int, str)):
            s = format(a, "x") if isinstance(a, int) else a.encode().hex()
        elif verb == "c" and isinstance(a, int):
            s = chr(a)
        else:
            s = f"%!{verb}({_fmt(a)})"
        if width and width != "*":
            s = s.ljust(int(width)) if "-" in flags else s.rjust(int(width), "0" if "0" in flags else " ")
        return s

    out = _VERB.sub(sub, fmt)
    extra = list(it)
    if extra:
        out += "%!(EXTRA " + ", ".join(_fmt(e) for e in extra) + ")"
    return out


def _js(*args: Any) -> str:
    s = _sprint(*args)
    rep = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
           "=": "\\u003D", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(rep.get(c, c) for c in s)


BUILTINS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truth(v),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (lambda x, y: x < y)(*_ordered(a, b)),
    "le": lambda a, b: (lambda x, y: x <= y)(*_ordered(a, b)),
    "gt": lambda a, b: (lambda x, y: x > y)(*_ordered(a, b)),
    "ge": lambda a, b: (lambda x, y: x >= y)(*_ordered(a, b)),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "println": lambda *a: " ".join(_fmt(x) for x in a) + "\n",
    "printf": _sprintf,
    "html": lambda *a: _html.escape(_sprint(*a), quote=True).replace("&#x27;", "&#39;"),
    "js": _js,
    "urlquery": lambda *a: urllib.parse.quote_plus(_sprint(*a)),
}

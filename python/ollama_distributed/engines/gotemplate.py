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
from decimal import Decimal
from typing import Any

from .goparse import (
    Action,
    Branch,
    Break,
    Chain,
    Command,
    Continue,
    Dot,
    Field,
    Ident,
    Literal,
    Pipe,
    TemplateError,
    Text,
    Variable,
    check_vars,
    parse,
    walk,
)


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
        self.root: list[Any] = parse(source)
        self._check_funcs(self.root)
        check_vars(self.root, ["$"])

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

"""Go's text/template language, read: the lexer, the tree and the parser.

`parse(source)` turns a template's text into a tree of the node types below;
`check_vars` checks that variables are declared before use, and `walk` visits
every node. Running a tree is gotemplate.py's concern; see there for what of
the language is supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class TemplateError(Exception):
    """A template that does not parse, or fails while it runs."""


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


def parse(source: str) -> list[Any]:
    """The tree of a template's text."""
    return _Parser(_items(source)).parse()


def check_vars(nodes: list[Any], scope: list[str]) -> None:
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
            check_vars(n.body, list(inner))
            if n.else_body is not None:
                check_vars(n.else_body, list(inner))


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

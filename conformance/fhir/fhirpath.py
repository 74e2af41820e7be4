"""A FHIRPath subset compiled to Python closures, for the invariants on the hot path.

fhirpathpy interprets its parse tree on every call (about 100 µs to 1 ms per invariant);
profile invariants use a small part of the language, so those are compiled here once into
plain closures. Anything outside the subset raises ``Unsupported`` at compile time and the
caller falls back to fhirpathpy, which stays the reference (a property test compares both).

Subset: paths (choice elements resolved: ``value`` finds ``valueCoding``), ``$this``,
string/number/boolean literals, ``( )``, ``.``, ``= != < <= > >=``, ``and or xor implies``,
and the functions exists([crit]) empty() count() where(crit) all(crit) not() first()
matches(re) startsWith(s) length() hasValue() extension(url). Evaluation follows FHIRPath's
collection semantics and three-valued logic (empty = unknown).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

Fn = Callable[[list[Any], Any], list[Any]]  # (focus collection, $this-root) → collection


class Unsupported(ValueError):
    """An expression outside the compiled subset."""


_TOKEN: Final = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<num>\d+(?:\.\d+)?)|(?P<op><=|>=|!=|[=<>().,|])"
    r"|(?P<id>\$this|[A-Za-z_][A-Za-z0-9_]*|`[^`]+`))"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise Unsupported(f"cannot read {text[pos : pos + 10]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _truth(items: list[Any]) -> bool | None:
    """FHIRPath singleton evaluation of a collection as a boolean (None: empty)."""
    if not items:
        return None
    if len(items) > 1:
        raise Unsupported("boolean of a collection of several items")
    value = items[0]
    return value if isinstance(value, bool) else True


def _children(items: list[Any], name: str) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        value = item.get(name)
        if value is None:
            # choice element: value → valueCoding, valueString...
            for key, got in item.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    value = got
                    break
            if value is None:
                continue
        if isinstance(value, list):
            out.extend(value)
        else:
            out.append(value)
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise Unsupported(f"expected {value!r}")
        self.i += 1
        return tok

    def at(self, *values: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[1] in values and tok[0] in ("op", "id")

    def parse(self) -> Fn:
        fn = self.implies()
        if self.peek() is not None:
            raise Unsupported(f"unexpected {self.peek()}")
        return fn

    def implies(self) -> Fn:
        left = self.or_()
        while self.at("implies"):
            self.take()
            left = _implies(left, self.or_())
        return left

    def or_(self) -> Fn:
        left = self.and_()
        while self.at("or", "xor"):
            op = self.take()[1]
            left = _or(left, self.and_()) if op == "or" else _xor(left, self.and_())
        return left

    def and_(self) -> Fn:
        left = self.equality()
        while self.at("and"):
            self.take()
            left = _and(left, self.equality())
        return left

    def equality(self) -> Fn:
        left = self.comparison()
        while self.at("=", "!="):
            op = self.take()[1]
            left = _compare(left, self.comparison(), op)
        return left

    def comparison(self) -> Fn:
        left = self.term()
        while self.at("<", "<=", ">", ">="):
            op = self.take()[1]
            left = _compare(left, self.term(), op)
        return left

    def term(self) -> Fn:
        fn = self.primary()
        while self.at("."):
            self.take()
            fn = _chain(fn, self.invocation())
        return fn

    def primary(self) -> Fn:
        tok = self.peek()
        if tok is None:
            raise Unsupported("unexpected end")
        kind, value = tok
        if value == "(" and kind == "op":
            self.take()
            inner = self.implies()
            self.take(")")
            return inner
        if kind == "str":
            self.take()
            text = _unquote(value)
            return lambda focus, root: [text]
        if kind == "num":
            self.take()
            number: int | float = float(value) if "." in value else int(value)
            return lambda focus, root: [number]
        if kind == "id" and value in ("true", "false"):
            self.take()
            flag = value == "true"
            return lambda focus, root: [flag]
        if kind == "id" and value == "$this":
            self.take()
            return lambda focus, root: focus
        return self.invocation()

    def invocation(self) -> Fn:
        kind, name = self.take()
        if kind != "id":
            raise Unsupported(f"unexpected {name!r}")
        name = name.strip("`")
        if not self.at("("):
            return lambda focus, root: _children(focus, name)
        self.take("(")
        args: list[Fn] = []
        if not self.at(")"):
            args.append(self.implies())
            while self.at(","):
                self.take()
                args.append(self.implies())
        self.take(")")
        return _function(name, args)


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def _chain(left: Fn, right: Fn) -> Fn:
    return lambda focus, root: right(left(focus, root), root)


def _implies(a: Fn, b: Fn) -> Fn:
    def run(focus: list[Any], root: Any) -> list[Any]:
        left = _truth(a(focus, root))
        if left is False:
            return [True]
        right = _truth(b(focus, root))
        if left is True:
            return [] if right is None else [right]
        return [True] if right is True else []

    return run


def _and(a: Fn, b: Fn) -> Fn:
    def run(focus: list[Any], root: Any) -> list[Any]:
        left = _truth(a(focus, root))
        if left is False:
            return [False]
        right = _truth(b(focus, root))
        if right is False:
            return [False]
        return [True] if left is True and right is True else []

    return run


def _or(a: Fn, b: Fn) -> Fn:
    def run(focus: list[Any], root: Any) -> list[Any]:
        left = _truth(a(focus, root))
        if left is True:
            return [True]
        right = _truth(b(focus, root))
        if right is True:
            return [True]
        return [False] if left is False and right is False else []

    return run


def _xor(a: Fn, b: Fn) -> Fn:
    def run(focus: list[Any], root: Any) -> list[Any]:
        left, right = _truth(a(focus, root)), _truth(b(focus, root))
        return [] if left is None or right is None else [left != right]

    return run


def _compare(a: Fn, b: Fn, op: str) -> Fn:
    def run(focus: list[Any], root: Any) -> list[Any]:
        left, right = a(focus, root), b(focus, root)
        if not left or not right:
            return []
        if op in ("=", "!="):
            same = len(left) == len(right) and all(_eq(x, y) for x, y in zip(left, right, strict=True))
            return [same if op == "=" else not same]
        if len(left) > 1 or len(right) > 1:
            raise Unsupported("comparison of collections")
        x, y = left[0], right[0]
        if type(x) is not type(y) and not (_number(x) and _number(y)):
            raise Unsupported("comparison of different types")
        if op == "<":
            return [x < y]
        if op == "<=":
            return [x <= y]
        if op == ">":
            return [x > y]
        return [x >= y]

    return run


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _eq(x: Any, y: Any) -> bool:
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    return bool(x == y)


def _function(name: str, args: list[Fn]) -> Fn:
    n = len(args)
    if name == "exists" and n <= 1:
        if not args:
            return lambda focus, root: [bool(focus)]
        crit = args[0]
        return lambda focus, root: [any(_truth(crit([x], root)) is True for x in focus)]
    if name == "empty" and n == 0:
        return lambda focus, root: [not focus]
    if name == "count" and n == 0:
        return lambda focus, root: [len(focus)]
    if name == "where" and n == 1:
        crit = args[0]
        return lambda focus, root: [x for x in focus if _truth(crit([x], root)) is True]
    if name == "all" and n == 1:
        crit = args[0]
        return lambda focus, root: [all(_truth(crit([x], root)) is True for x in focus)]
    if name == "not" and n == 0:
        return _not
    if name == "first" and n == 0:
        return lambda focus, root: focus[:1]
    if name == "hasValue" and n == 0:
        return lambda focus, root: [len(focus) == 1 and not isinstance(focus[0], dict | list)]
    if name == "length" and n == 0:
        return lambda focus, root: [len(focus[0])] if _one_string(focus) else []
    if name in ("matches", "startsWith") and n == 1:
        return _string_test(name, args[0])
    if name == "extension" and n == 1:
        url_fn = args[0]

        def run(focus: list[Any], root: Any) -> list[Any]:
            urls = url_fn(focus, root)
            if len(urls) != 1:
                return []
            return [
                e for e in _children(focus, "extension") if isinstance(e, dict) and e.get("url") == urls[0]
            ]

        return run
    raise Unsupported(f"function {name}/{n}")


def _not(focus: list[Any], root: Any) -> list[Any]:
    value = _truth(focus)
    return [] if value is None else [not value]


def _one_string(focus: list[Any]) -> bool:
    if len(focus) > 1:
        raise Unsupported("string function on several items")
    return bool(focus) and isinstance(focus[0], str)


def _string_test(name: str, arg: Fn) -> Fn:
    cache: dict[str, re.Pattern[str]] = {}

    def run(focus: list[Any], root: Any) -> list[Any]:
        if not _one_string(focus):
            return []
        pattern = arg(focus, root)
        if len(pattern) != 1 or not isinstance(pattern[0], str):
            return []
        text = focus[0]
        if name == "startsWith":
            return [text.startswith(pattern[0])]
        compiled = cache.get(pattern[0])
        if compiled is None:
            compiled = cache[pattern[0]] = re.compile(pattern[0])
        return [compiled.search(text) is not None]

    return run


def compile_fast(expression: str) -> Callable[[Any, Any], list[Any]]:
    """Compile ``expression``; raises Unsupported when it leaves the subset."""
    fn = _Parser(expression).parse()

    def run(value: Any, env: Any = None) -> list[Any]:
        return fn([value] if value is not None else [], value)

    return run

"""Parse lme4-style model formulas safely (our own tokenizer + recursive descent).

A formula comes from an untrusted job file, so it is never ``eval``-ed: it is
tokenized and parsed here into an immutable syntax tree (:mod:`fitting.formula_nodes`),
then expanded into terms with R's rules (:mod:`fitting.terms`).

Grammar (R precedence, loosest first)::

    formula := sum '~' sum
    bar     := sum [('|' | '||') sum]           only directly inside '( )'
    sum     := prod (('+' | '-') prod)*
    prod    := colon (('*' | '/') colon)*
    colon   := unary (':' unary)*
    unary   := ('-' | '+') unary | power
    power   := primary ['^' unary]              right associative
    primary := NAME | NUMBER | NAME '(' sum (',' sum)* ')' | '(' bar ')'

Random-effects terms ``(expr | g)`` / ``(expr || g)`` are split off the right-hand side
as lme4's ``findbars``/``nobars`` do; ``||`` is expanded into independent terms
(``expandDoubleVerts``) and ``g1/g2`` into ``g2:g1`` and ``g1`` (``expandSlash``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from fitting.errors import FormulaError
from fitting.formula_nodes import (
    Binary,
    Call,
    Name,
    Node,
    Number,
    Paren,
    Unary,
    deparse,
    iter_nodes,
    names_in,
)
from fitting.terms import ModelTerms, expand_terms, formula_error

__all__ = [
    "ParsedFormula",
    "RandomTerm",
    "ModelTerms",
    "parse_formula",
    "formula_variables",
    "ALLOWED_FUNCTIONS",
]

#: Functions a formula may call, with their number of arguments.
ALLOWED_FUNCTIONS: dict[str, int] = {
    "I": 1,
    "abs": 1,
    "center": 1,
    "cbind": 2,
    "exp": 1,
    "log": 1,
    "log1p": 1,
    "offset": 1,
    "scale": 1,
    "sqrt": 1,
}
_ARITH_OPS = frozenset({"+", "-", "*", "/", "^"})
_MAX_NESTING = 50  # parenthesis/unary nesting accepted by the recursive-descent parser
_MAX_DEPTH = 200  # syntax-tree depth (bounds every recursive walk over the tree)
_MAX_LENGTH = 20_000


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term after ``||`` and ``/`` expansion.

    Attributes
    ----------
    lhs : ModelTerms
        Terms of the left side (intercept implicit unless ``0 +`` / ``- 1``).
    group : Node
        Grouping expression: a name or ``:`` interactions of names.
    group_name : str
        Deparsed grouping expression, as lme4 names the group (``"herd"``, ``"b:a"``).
    text : str
        The term as R would print it, e.g. ``"(0 + x | g)"``, for messages.
    """

    lhs: ModelTerms
    group: Node
    group_name: str
    text: str


@dataclass(frozen=True)
class ParsedFormula:
    """Immutable result of :func:`parse_formula`.

    Attributes
    ----------
    text : str
        The formula as given.
    response : Node
        Left-hand side.
    response_label : str
        Deparsed response (``"cbind(incidence, size - incidence)"``).
    rhs : Node
        Whole right-hand side as parsed.
    fixed : ModelTerms
        Fixed-effects terms (random-effects terms removed), response as variable 0.
    random : tuple of RandomTerm
        Random-effects terms in formula order.
    columns : tuple of str
        Every column name referenced, in order of first appearance.
    warnings : tuple of str
        Notes raised while expanding (e.g. the response repeated on the right).
    """

    text: str
    response: Node
    response_label: str
    rhs: Node
    fixed: ModelTerms
    random: tuple[RandomTerm, ...]
    columns: tuple[str, ...]
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", "op", "eof"
    value: str
    pos: int

    def describe(self) -> str:
        return "end of formula" if self.kind == "eof" else repr(self.value)


_OPERATORS = "~+-*/^:(),|"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "|" and text.startswith("||", i):
            tokens.append(_Token("op", "||", i))
            i += 2
        elif ch in _OPERATORS:
            tokens.append(_Token("op", ch, i))
            i += 1
        elif ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i
            while j < n and text[j].isdigit():
                j += 1
            if j < n and text[j] == ".":
                j += 1
                while j < n and text[j].isdigit():
                    j += 1
            if j < n and text[j] in "eE":
                k = j + 1
                if k < n and text[k] in "+-":
                    k += 1
                if k < n and text[k].isdigit():
                    j = k
                    while j < n and text[j].isdigit():
                        j += 1
            tokens.append(_Token("number", text[i:j], i))
            i = j
        elif ch.isalpha() or ch == ".":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            tokens.append(_Token("name", text[i:j], i))
            i = j
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise FormulaError(
                    f"unterminated backquoted name starting at position {i} in formula {text!r}"
                )
            if end == i + 1:
                raise FormulaError(f"empty backquoted name at position {i} in formula {text!r}")
            tokens.append(_Token("qname", text[i + 1 : end], i))
            i = end + 1
        else:
            raise FormulaError(f"unexpected character {ch!r} at position {i} in formula {text!r}")
    tokens.append(_Token("eof", "", n))
    return tokens


# --------------------------------------------------------------------------- parser
class _Parser:
    """Recursive-descent parser over the token list (see the module grammar)."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.nesting = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_op(self, *values: str) -> bool:
        return self.tok.kind == "op" and self.tok.value in values

    def unexpected(self, hint: str = "") -> FormulaError:
        tok = self.tok
        if not hint and tok.kind == "op" and tok.value in ("|", "||"):
            hint = f" ('{tok.value}' is only allowed inside parentheses, as in (1 | g))"
        if not hint and tok.kind == "op" and tok.value == "~":
            hint = " (a formula has exactly one '~')"
        return FormulaError(
            f"unexpected {tok.describe()} at position {tok.pos} in formula {self.text!r}{hint}"
        )

    def expect(self, value: str, opened: _Token | None = None) -> None:
        if not self.is_op(value):
            hint = ""
            if opened is not None and self.tok.kind == "eof":
                hint = f" (unbalanced parentheses: '(' at position {opened.pos} is not closed)"
            elif opened is not None:
                hint = f" (expected {value!r})"
            raise self.unexpected(hint)
        self.advance()

    def parse(self) -> tuple[Node, Node]:
        if not any(t.kind == "op" and t.value == "~" for t in self.tokens):
            raise FormulaError(
                f"formula {self.text!r} has no '~'; expected 'response ~ terms'"
            )
        if self.is_op("~"):
            raise FormulaError(f"formula {self.text!r} has no response before '~'")
        lhs = self.parse_sum()
        self.expect("~")
        if self.tok.kind == "eof":
            raise FormulaError(f"formula {self.text!r} has an empty right-hand side after '~'")
        rhs = self.parse_sum()
        if self.tok.kind != "eof":
            if self.is_op(")"):
                raise self.unexpected(" (unbalanced parentheses)")
            raise self.unexpected()
        return lhs, rhs

    def parse_bar(self) -> Node:
        left = self.parse_sum()
        if self.is_op("|", "||"):
            tok = self.advance()
            right = self.parse_sum()
            return Binary(tok.value, left, right, pos=tok.pos)
        return left

    def _binary_chain(self, ops: tuple[str, ...], operand) -> Node:
        node = operand()
        while self.is_op(*ops):
            tok = self.advance()
            node = Binary(tok.value, node, operand(), pos=tok.pos)
        return node

    def parse_sum(self) -> Node:
        return self._binary_chain(("+", "-"), self.parse_prod)

    def parse_prod(self) -> Node:
        return self._binary_chain(("*", "/"), self.parse_colon)

    def parse_colon(self) -> Node:
        return self._binary_chain((":",), self.parse_unary)

    def parse_unary(self) -> Node:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise FormulaError(
                f"formula is nested too deeply (more than {_MAX_NESTING} levels) at position "
                f"{self.tok.pos} in formula {self.text!r}"
            )
        try:
            if self.is_op("-", "+"):
                tok = self.advance()
                return Unary(tok.value, self.parse_unary(), pos=tok.pos)
            return self.parse_power()
        finally:
            self.nesting -= 1

    def parse_power(self) -> Node:
        base = self.parse_primary()
        if self.is_op("^"):
            tok = self.advance()
            return Binary("^", base, self.parse_unary(), pos=tok.pos)
        return base

    def parse_primary(self) -> Node:
        tok = self.tok
        if tok.kind == "number":
            self.advance()
            return Number(float(tok.value), pos=tok.pos)
        if tok.kind == "qname":
            self.advance()
            return Name(tok.value, pos=tok.pos)
        if tok.kind == "name":
            self.advance()
            if self.is_op("("):
                return self.parse_call(tok)
            return Name(tok.value, pos=tok.pos)
        if self.is_op("("):
            self.advance()
            if self.is_op(")"):
                raise self.unexpected(" (empty parentheses)")
            inner = self.parse_bar()
            self.expect(")", opened=tok)
            return Paren(inner, pos=tok.pos)
        raise self.unexpected()

    def parse_call(self, name_tok: _Token) -> Node:
        func = name_tok.value
        if func not in ALLOWED_FUNCTIONS:
            allowed = ", ".join(sorted(ALLOWED_FUNCTIONS))
            raise FormulaError(
                f"unknown function '{func}' at position {name_tok.pos} in formula "
                f"{self.text!r}; allowed: {allowed}"
            )
        open_tok = self.advance()
        args = []
        if not self.is_op(")"):
            args.append(self.parse_sum())
            while self.is_op(","):
                self.advance()
                args.append(self.parse_sum())
        self.expect(")", opened=open_tok)
        call = Call(func, tuple(args), pos=name_tok.pos)
        if len(args) != ALLOWED_FUNCTIONS[func]:
            raise formula_error(
                f"{func}() takes {ALLOWED_FUNCTIONS[func]} argument(s), got {len(args)}",
                call,
                self.text,
            )
        for arg in args:
            self.check_arithmetic(arg, call)
        return call

    def check_arithmetic(self, node: Node, call: Call) -> None:
        """Function arguments are arithmetic: no ':' and no offset()/cbind() inside."""
        for sub in iter_nodes(node):
            if isinstance(sub, Binary) and sub.op not in _ARITH_OPS:
                raise formula_error(
                    f"operator '{sub.op}' is not allowed inside {call.func}(...)", sub, self.text
                )
            if isinstance(sub, Call) and sub.func in ("offset", "cbind"):
                raise formula_error(
                    f"{sub.func}() cannot be used inside {call.func}(...)", sub, self.text
                )


def _tree_depth(node: Node) -> int:
    """Depth of the syntax tree, computed without recursion."""
    depth = 0
    stack = [(node, 1)]
    while stack:
        current, d = stack.pop()
        depth = max(depth, d)
        if isinstance(current, Call):
            stack.extend((a, d + 1) for a in current.args)
        elif isinstance(current, Unary):
            stack.append((current.operand, d + 1))
        elif isinstance(current, Paren):
            stack.append((current.expr, d + 1))
        elif isinstance(current, Binary):
            stack.append((current.left, d + 1))
            stack.append((current.right, d + 1))
    return depth


# ------------------------------------------------------------- random-effects terms
def _is_bar(node: Node) -> bool:
    return isinstance(node, Binary) and node.op in ("|", "||")


def _unparen(node: Node) -> Node:
    while isinstance(node, Paren):
        node = node.expr
    return node


def _contains_bar(node: Node) -> bool:
    return any(_is_bar(sub) for sub in iter_nodes(node))


def _split_bars(node: Node, text: str) -> tuple[Node | None, list[Binary]]:
    """lme4's ``nobars``/``findbars`` for bars added with ``+`` (possibly parenthesised)."""
    inner = _unparen(node)
    if _is_bar(inner):
        if not isinstance(node, Paren):
            raise formula_error(f"'{inner.op}' must be inside parentheses, as in (1 | g)", inner, text)
        return None, [inner]  # type: ignore[list-item]
    if not _contains_bar(node):
        return node, []
    if isinstance(node, Paren):
        fixed, bars = _split_bars(node.expr, text)
        return (Paren(fixed, pos=node.pos) if fixed is not None else None), bars
    if isinstance(node, Binary) and node.op in ("+", "-"):
        left, left_bars = _split_bars(node.left, text)
        if node.op == "-":
            if _contains_bar(node.right):
                raise formula_error("random-effects terms cannot be removed with '-'", node, text)
            if left is None:
                return Unary("-", node.right, pos=node.pos), left_bars
            return Binary("-", left, node.right, pos=node.pos), left_bars
        right, right_bars = _split_bars(node.right, text)
        if left is None:
            return right, left_bars + right_bars
        if right is None:
            return left, left_bars + right_bars
        return Binary("+", left, right, pos=node.pos), left_bars + right_bars
    if isinstance(node, Unary) and node.op == "+":
        return _split_bars(node.operand, text)
    bar = next(sub for sub in iter_nodes(node) if _is_bar(sub))
    raise formula_error(
        f"random-effects term '({deparse(bar)})' can only be added with '+'", bar, text
    )


def _check_group(node: Node, text: str) -> None:
    for sub in iter_nodes(node):
        if isinstance(sub, (Name, Paren)):
            if isinstance(sub, Name) and sub.name == ".":
                raise formula_error("'.' cannot be a grouping factor", sub, text)
            continue
        if isinstance(sub, Binary) and sub.op in (":", "/"):
            continue
        raise formula_error(
            f"invalid grouping factor '{deparse(node)}' (use column names joined by ':' or '/')",
            node,
            text,
        )


def _slash_terms(node: Node) -> list[Node]:
    """lme4's ``slashTerms``: ``a/b/c`` -> ``[a, b, c]`` (left to right)."""
    if isinstance(node, Binary) and node.op == "/":
        return _slash_terms(node.left) + _slash_terms(node.right)
    return [node]


def _expand_slash(group: Node) -> list[Node]:
    """lme4's ``expandSlash``: ``a/b`` -> ``[b:a, a]``; ``a/b/c`` -> ``[c:(b:a), b:a, a]``."""
    parts = _slash_terms(group)
    if len(parts) == 1:
        return parts
    out = [parts[0]]
    for part in parts[1:]:
        out.insert(0, Binary(":", part, out[0], pos=group.pos))
    return out


def _colon_chain(nodes: list[Node]) -> Node:
    chain = nodes[0]
    for node in nodes[1:]:
        chain = Binary(":", chain, node)
    return chain


def _expand_bar(bar: Binary, text: str) -> list[RandomTerm]:
    _check_group(bar.right, text)
    if _contains_bar(bar.left):
        raise formula_error("random-effects terms cannot be nested", bar, text)
    lhs_terms, _ = expand_terms(bar.left, text, allow_offset=False)
    if bar.op == "||":  # lme4's expandDoubleVerts: (1 | g) + (0 + t | g) per term t
        pieces: list[Node] = [Number(1.0)] if lhs_terms.intercept else []
        for term in lhs_terms.terms:
            chain = _colon_chain([lhs_terms.variables[i] for i in term])
            pieces.append(Binary("+", Number(0.0), chain))
    else:
        pieces = [bar.left]
    out = []
    for piece in pieces:
        terms, _ = expand_terms(piece, text, allow_offset=False)
        if not terms.intercept and not terms.terms:
            raise formula_error(
                f"random-effects term '({deparse(bar)})' has no columns", bar, text
            )
        for group in _expand_slash(bar.right):
            group_name = deparse(group)
            out.append(RandomTerm(terms, group, group_name, f"({deparse(piece)} | {group_name})"))
    return out


# ----------------------------------------------------------------------- public API
@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> ParsedFormula:
    if len(text) > _MAX_LENGTH:
        raise FormulaError(f"formula is too long ({len(text)} characters > {_MAX_LENGTH})")
    parser = _Parser(text)
    response, rhs = parser.parse()
    if max(_tree_depth(response), _tree_depth(rhs)) > _MAX_DEPTH:
        raise FormulaError(f"formula {text[:80]!r} is too long or nested too deeply")
    if _contains_bar(response):
        raise FormulaError(f"the response of formula {text!r} cannot contain '|'")
    resp = _unparen(response)
    if isinstance(resp, Call) and resp.func == "offset":
        raise formula_error("offset() cannot be the response", resp, text)
    for sub in iter_nodes(response):
        if isinstance(sub, Binary) and sub.op == ":":
            raise formula_error("operator ':' is not allowed in the response", sub, text)
        if isinstance(sub, Call) and sub.func == "cbind" and sub is not resp:
            raise formula_error("cbind() must be the whole response", sub, text)
    fixed_rhs, bars = _split_bars(rhs, text)
    if fixed_rhs is None:
        fixed_rhs = Number(1.0)
    fixed, warnings = expand_terms(fixed_rhs, text, response=response)
    random: list[RandomTerm] = []
    for bar in bars:
        random.extend(_expand_bar(bar, text))
    columns = tuple(dict.fromkeys(names_in(response) + names_in(rhs)))
    return ParsedFormula(
        text=text,
        response=response,
        response_label=deparse(response),
        rhs=rhs,
        fixed=fixed,
        random=tuple(random),
        columns=columns,
        warnings=warnings,
    )


def parse_formula(text: str) -> ParsedFormula:
    """Parse an lme4-style formula into an immutable :class:`ParsedFormula` (cached).

    Parameters
    ----------
    text : str
        Formula such as ``"use ~ age + I(age^2) + urban + livch + (1 | district)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        Syntax errors (with the position and offending token), a missing ``~``, an
        empty right-hand side, ``|`` outside parentheses, unbalanced parentheses,
        unknown functions, and invalid terms.

    Examples
    --------
    >>> parse_formula("y ~ a*b + (1 | g)").fixed.term_labels
    ('a', 'b', 'a:b')
    """
    if not isinstance(text, str):
        raise FormulaError(f"formula must be a string, got {type(text).__name__}")
    try:
        return _parse_cached(text)
    except RecursionError:  # pragma: no cover - guarded by the nesting/depth limits
        raise FormulaError(f"formula {text[:80]!r} is nested too deeply") from None


def formula_variables(parsed: ParsedFormula | str) -> dict[str, tuple[str, ...]]:
    """Data columns a formula references, by role (for schema validation without data).

    Parameters
    ----------
    parsed : ParsedFormula or str
        Parsed formula (a string is parsed first).

    Returns
    -------
    dict
        Keys ``"response"``, ``"fixed"``, ``"random"``, ``"grouping"``, ``"offset"``;
        each a sorted tuple of column names. ``"fixed"`` are the columns of the
        fixed-effects terms, ``"random"`` those of the random-effects terms' left
        sides, ``"grouping"`` the grouping factors, ``"offset"`` those inside
        ``offset(...)``.

    Examples
    --------
    >>> formula_variables("cbind(s, n - s) ~ x + offset(log(t)) + (x | g)")["response"]
    ('n', 's')
    """
    if isinstance(parsed, str):
        parsed = parse_formula(parsed)
    fixed_names: set[str] = set()
    offset_names: set[str] = set()
    start = 1 if parsed.fixed.has_response else 0
    for var in parsed.fixed.variables[start:]:
        target = offset_names if isinstance(var, Call) and var.func == "offset" else fixed_names
        target.update(names_in(var))
    random_names: set[str] = set()
    grouping: set[str] = set()
    for term in parsed.random:
        for var in term.lhs.variables:
            random_names.update(names_in(var))
        grouping.update(names_in(term.group))
    return {
        "response": tuple(sorted(names_in(parsed.response))),
        "fixed": tuple(sorted(fixed_names)),
        "random": tuple(sorted(random_names)),
        "grouping": tuple(sorted(grouping)),
        "offset": tuple(sorted(offset_names)),
    }

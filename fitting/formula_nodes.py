"""Immutable syntax-tree nodes of a model formula and R-compatible deparsing.

The nodes are frozen dataclasses, so equal expressions compare and hash equal (the
source position ``pos`` is excluded from comparison). That structural equality is what
R's ``terms()`` uses to decide that two occurrences of ``I(age^2)`` are one variable.

:func:`deparse` renders a node exactly as R's ``deparse()`` does for the constructs
the formula language allows, which is how coefficient names such as ``I(age^2)``,
``I(age - 5)``, ``log(x)`` or ``scale(HEIGHT)`` are produced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "Node",
    "Name",
    "Number",
    "Call",
    "Unary",
    "Binary",
    "Paren",
    "deparse",
    "format_r_number",
    "quote_name",
    "names_in",
    "iter_nodes",
]


@dataclass(frozen=True)
class Node:
    """Base class of formula syntax-tree nodes.

    Attributes
    ----------
    pos : int
        0-based character offset of the node in the formula text (-1 when the node was
        built programmatically). Not part of equality or hashing.
    """

    pos: int = field(default=-1, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Name(Node):
    """A column reference (``age``, or backquoted ```my col```)."""

    name: str


@dataclass(frozen=True)
class Number(Node):
    """A numeric literal; compared by value, like R's ``MatchVar``."""

    value: float


@dataclass(frozen=True)
class Call(Node):
    """A function call ``func(arg, ...)`` with an allowed function name."""

    func: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Unary(Node):
    """A unary ``-`` or ``+``."""

    op: str
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    """A binary operator: ``+ - * / ^ :`` or the random-effects bars ``|`` / ``||``."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Paren(Node):
    """Explicit parentheses, kept (as R does) so that deparsing reproduces them."""

    expr: Node


# R's reserved words cannot be used as bare names; deparse backquotes them.
_RESERVED = frozenset(
    {
        "if", "else", "repeat", "while", "function", "for", "next", "break", "in",
        "TRUE", "FALSE", "NULL", "Inf", "NaN", "NA", "NA_integer_", "NA_real_",
        "NA_character_", "NA_complex_",
    }
)
# Operators R deparses with surrounding spaces (PP_BINARY) vs without (PP_BINARY2).
_SPACED = frozenset({"+", "-", "*", "|", "||", "~"})


def is_syntactic(name: str) -> bool:
    """Whether ``name`` is a syntactic R name (deparsed without backquotes).

    Parameters
    ----------
    name : str
        Column name.

    Returns
    -------
    bool
    """
    if not name or name in _RESERVED:
        return False
    first = name[0]
    if not (first.isalpha() or first == "."):
        return False
    if first == "." and len(name) > 1 and name[1].isdigit():
        return False
    return all(ch.isalnum() or ch in "._" for ch in name)


def quote_name(name: str) -> str:
    """Render a column name as R's deparse does: backquoted unless syntactic.

    Parameters
    ----------
    name : str
        Column name.

    Returns
    -------
    str
        ``name`` or ```name```.
    """
    return name if is_syntactic(name) else f"`{name}`"


def format_r_number(value: float) -> str:
    """Format a double as R's ``deparse``/``as.character`` do (15 significant digits).

    R uses the fewest significant digits (at most 15) that represent the value and
    picks fixed notation unless scientific notation is strictly shorter, so ``2`` is
    ``"2"``, ``0.5`` is ``"0.5"``, ``1e5`` is ``"1e+05"`` and ``0.0001`` is ``"1e-04"``.

    Parameters
    ----------
    value : float
        The number.

    Returns
    -------
    str
    """
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0:
        return "0"
    target = float(f"{x:.14e}")
    for digits in range(1, 16):
        sci = f"{x:.{digits - 1}e}"
        if float(sci) == target:
            break
    mantissa, exp_text = sci.split("e")
    exponent = int(exp_text)
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    sci_text = f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    fixed_text = f"{x:.{max(0, digits - 1 - exponent)}f}"
    return fixed_text if len(fixed_text) <= len(sci_text) else sci_text


def deparse(node: Node) -> str:
    """Render a node as R's ``deparse()`` would.

    Binary ``+ - * | ||`` get surrounding spaces; ``/ ^ :`` do not; explicit
    parentheses are kept; function arguments are separated by ``", "``. A ``:`` whose
    right operand is itself a ``:`` (only built programmatically, for nested grouping
    factors ``a/b/c``) is parenthesised, as R's deparser does.

    Parameters
    ----------
    node : Node
        Expression.

    Returns
    -------
    str
    """
    if isinstance(node, Name):
        return quote_name(node.name)
    if isinstance(node, Number):
        return format_r_number(node.value)
    if isinstance(node, Call):
        return f"{node.func}({', '.join(deparse(a) for a in node.args)})"
    if isinstance(node, Unary):
        return node.op + deparse(node.operand)
    if isinstance(node, Paren):
        return f"({deparse(node.expr)})"
    if isinstance(node, Binary):
        left = deparse(node.left)
        right = deparse(node.right)
        if isinstance(node.right, Binary) and node.right.op == node.op and node.op == ":":
            right = f"({right})"
        if node.op in _SPACED:
            return f"{left} {node.op} {right}"
        return f"{left}{node.op}{right}"
    raise TypeError(f"not a formula node: {node!r}")


def iter_nodes(node: Node):
    """Yield ``node`` and all its descendants, depth first, left to right.

    Iterative (no recursion), so it is safe on long left-deep sums.

    Parameters
    ----------
    node : Node
        Root.

    Yields
    ------
    Node
    """
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, Call):
            stack.extend(reversed(current.args))
        elif isinstance(current, Unary):
            stack.append(current.operand)
        elif isinstance(current, Paren):
            stack.append(current.expr)
        elif isinstance(current, Binary):
            stack.append(current.right)
            stack.append(current.left)


def names_in(node: Node) -> tuple[str, ...]:
    """Column names referenced in ``node``, in order of first appearance.

    Parameters
    ----------
    node : Node
        Expression.

    Returns
    -------
    tuple of str
    """
    seen: dict[str, None] = {}
    for sub in iter_nodes(node):
        if isinstance(sub, Name):
            seen.setdefault(sub.name, None)
    return tuple(seen)

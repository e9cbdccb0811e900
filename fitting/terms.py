"""Expansion of a formula right-hand side into model terms, as R's ``terms.formula``.

This is a transcription of the algorithm in R's ``src/library/stats/src/model.c``
(``ExtractVars``, ``EncodeVars``, ``TermCode``), on our own syntax tree:

* variables are the distinct atoms (column names and function calls) in order of first
  appearance; a term is a set of variables, held as a bit mask;
* ``a + b`` concatenates, ``a:b`` interacts, ``a*b = a + b + a:b``,
  ``a/b = a + a:b``, ``(a+b)^2`` adds all interactions up to order 2, ``a - b`` and
  ``-1`` / ``+0`` / ``0 +`` delete terms or the intercept; duplicates are dropped;
* terms are sorted by order (main effects, then two-way, ...), stable within an order;
* a term's label joins its variables' deparsed names with ``:`` in variable order;
* each factor in a term is coded by contrasts (code 1) if the term without it is
  contained in a preceding term (the empty term always counts), else by indicators
  (code 2). The no-intercept adjustment of ``model.matrix`` depends on which
  variables are factors and is applied by :mod:`fitting.modelmatrix`.
"""
from __future__ import annotations

from dataclasses import dataclass

from fitting.errors import FormulaError
from fitting.formula_nodes import Binary, Call, Name, Node, Number, Paren, Unary, deparse

__all__ = ["ModelTerms", "expand_terms", "formula_error"]


@dataclass(frozen=True)
class ModelTerms:
    """The expanded terms of one model matrix (the fixed part, or one bar's left side).

    Attributes
    ----------
    variables : tuple of Node
        R's variable list (response first when ``has_response``), in order of first
        appearance.
    labels : tuple of str
        Deparsed variables (``"age"``, ``"I(age^2)"``, ``"offset(log(n))"``).
    terms : tuple of tuple of int
        Each term as ascending indices into ``variables``, sorted by order.
    codes : tuple of tuple of int
        Per term and per variable of the term: 1 = contrasts, 2 = indicator coding.
    term_labels : tuple of str
        ``"a"``, ``"a:b"``, ...
    intercept : bool
        Whether the model matrix has an ``(Intercept)`` column.
    offsets : tuple of Node
        Arguments of the ``offset(...)`` calls (summed into the offset).
    has_response : bool
        Whether ``variables[0]`` is the response.
    """

    variables: tuple[Node, ...]
    labels: tuple[str, ...]
    terms: tuple[tuple[int, ...], ...]
    codes: tuple[tuple[int, ...], ...]
    term_labels: tuple[str, ...]
    intercept: bool
    offsets: tuple[Node, ...]
    has_response: bool = False

    @property
    def used_variables(self) -> tuple[int, ...]:
        """Indices of the variables appearing in at least one term, ascending."""
        return tuple(sorted({i for term in self.terms for i in term}))


def formula_error(message: str, node: Node | None, text: str) -> FormulaError:
    """Build a :class:`FormulaError` locating ``node`` in the formula ``text``.

    Parameters
    ----------
    message : str
        What is wrong, naming the culprit.
    node : Node or None
        Offending node (its ``pos`` is reported when known).
    text : str
        The formula.

    Returns
    -------
    FormulaError
    """
    where = f" at position {node.pos}" if node is not None and node.pos >= 0 else ""
    return FormulaError(f"{message}{where} in formula {text!r}")


def _trim(terms: list[int]) -> list[int]:
    """R's ``TrimRepeats``: drop empty terms and later duplicates."""
    seen: set[int] = set()
    out = []
    for term in terms:
        if term and term not in seen:
            seen.add(term)
            out.append(term)
    return out


class _Expander:
    """One run of R's ``ExtractVars`` + ``EncodeVars`` (holds the intercept/parity state)."""

    def __init__(self, text: str, *, allow_offset: bool, response: Node | None):
        self.text = text
        self.allow_offset = allow_offset
        self.variables: list[Node] = []
        self.index: dict[Node, int] = {}
        self.intercept = True
        self.parity = True
        if response is not None:
            self.install(response)

    def install(self, node: Node) -> int:
        idx = self.index.get(node)
        if idx is None:
            idx = self.index[node] = len(self.variables)
            self.variables.append(node)
        return idx

    def error(self, message: str, node: Node) -> FormulaError:
        return formula_error(message, node, self.text)

    def _check_atom(self, node: Node) -> None:
        if isinstance(node, Name) and node.name == ".":
            raise self.error("'.' (all other columns) is not supported; name the columns", node)
        if isinstance(node, Call):
            if node.func == "cbind":
                raise self.error("cbind() is only allowed as the response (left of '~')", node)
            if node.func == "offset" and not self.allow_offset:
                raise self.error("offset() is not allowed inside a random-effects term", node)

    # -- R's ExtractVars: fixes the variable order (first appearance) ----------------
    def extract(self, node: Node, checkonly: bool) -> None:
        if isinstance(node, Number):
            if node.value not in (0.0, 1.0):
                raise self.error(f"invalid model term '{deparse(node)}' (only 0 or 1 allowed)", node)
        elif isinstance(node, Name):
            self._check_atom(node)
            if not checkonly:
                self.install(node)
        elif isinstance(node, Call):
            self._check_atom(node)
            self.install(node)  # R installs calls even under '-' (see model.c FIXME)
        elif isinstance(node, Paren):
            if isinstance(node.expr, Binary) and node.expr.op in ("|", "||"):
                raise self.error(
                    f"random-effects term '{deparse(node)}' can only be added with '+'", node
                )
            self.extract(node.expr, checkonly)
        elif isinstance(node, Unary):
            self.extract(node.operand, True if node.op == "-" else checkonly)
        elif isinstance(node, Binary):
            if node.op in ("|", "||"):
                raise self.error(f"'{node.op}' must be inside parentheses, as in (1 | g)", node)
            if node.op == "^":
                if not isinstance(node.right, Number):
                    raise self.error("invalid power in formula (must be an integer >= 2)", node)
                self.extract(node.left, checkonly)
            elif node.op == "-":
                self.extract(node.left, checkonly)
                self.extract(node.right, True)
            else:
                self.extract(node.left, checkonly)
                self.extract(node.right, checkonly)
        else:  # pragma: no cover - the parser only builds the node types above
            raise self.error("invalid model formula", node)

    # -- R's EncodeVars: expansion into bit-mask terms --------------------------------
    def encode(self, node: Node) -> list[int]:
        if isinstance(node, Number):
            one = node.value == 1.0
            self.intercept = self.parity if one else not self.parity
            return []
        if isinstance(node, (Name, Call)):
            return [1 << self.install(node)]
        if isinstance(node, Paren):
            return self.encode(node.expr)
        if isinstance(node, Unary):
            if node.op == "+":
                return self.encode(node.operand)
            return self._delete([], node.operand)
        assert isinstance(node, Binary)
        op = node.op
        if op == "-":
            return self._delete(self.encode(node.left), node.right)
        if op == "^":
            return self._power(node)
        left = self.encode(node.left)
        right = self.encode(node.right)
        if op == "+":
            return _trim(left + right)
        if op == ":":
            return _trim([a | b for a in left for b in right])
        if op == "*":
            return _trim(left + right + [a | b for a in left for b in right])
        if op == "/":
            union = 0
            for term in left:
                union |= term
            return _trim(left + [union | b for b in right])
        raise self.error(f"operator '{op}' is not allowed here", node)  # pragma: no cover

    def _delete(self, left: list[int], right_node: Node) -> list[int]:
        self.parity = not self.parity
        right = self.encode(right_node)
        self.parity = not self.parity
        removed = set(right)
        return [term for term in left if term not in removed]

    def _power(self, node: Binary) -> list[int]:
        value = node.right.value  # type: ignore[attr-defined]
        if value != int(value) or value < 2:
            raise self.error("invalid power in formula (must be an integer >= 2)", node)
        base = self.encode(node.left)
        result = base
        for _ in range(int(value) - 1):
            result = _trim([a | b for a in base for b in result])
        return result


def _term_code(terms: list[int], position: int, var_bit: int) -> int:
    """R's ``TermCode``: 1 (contrasts) or 2 (indicators) for one factor of one term."""
    rest = terms[position] & ~var_bit
    if rest == 0:
        return 1
    for earlier in terms[:position]:
        if rest & ~earlier == 0:
            return 1
    return 2


def expand_terms(
    rhs: Node,
    text: str,
    *,
    response: Node | None = None,
    allow_offset: bool = True,
) -> tuple[ModelTerms, tuple[str, ...]]:
    """Expand a right-hand side (bars already removed) into sorted, coded terms.

    Parameters
    ----------
    rhs : Node
        Right-hand side without random-effects terms.
    text : str
        Full formula text, for error messages.
    response : Node, optional
        The response; installed as variable 0 as R does. A right-hand-side term equal
        to the response alone is dropped with a warning, like ``model.matrix``.
    allow_offset : bool
        Whether ``offset(...)`` may appear (not inside a random-effects term).

    Returns
    -------
    terms : ModelTerms
    warnings : tuple of str

    Raises
    ------
    FormulaError
        Invalid terms (numbers other than 0/1, bad powers, misplaced ``cbind``/
        ``offset``/``|``, ``.``).
    """
    expander = _Expander(text, allow_offset=allow_offset, response=response)
    expander.extract(rhs, False)
    encoded = expander.encode(rhs)
    variables = tuple(expander.variables)
    labels = tuple(deparse(v) for v in variables)
    offset_bits = 0
    offsets = []
    for i, var in enumerate(variables):
        if isinstance(var, Call) and var.func == "offset" and not (response is not None and i == 0):
            offset_bits |= 1 << i
            offsets.append(var.args[0])
    warnings: list[str] = []
    kept = []
    for term in encoded:
        if term & offset_bits:
            continue
        if response is not None and term == 1:
            warnings.append(
                f"the response '{labels[0]}' appeared on the right-hand side and was dropped"
            )
            continue
        kept.append(term)
    # Stable sort by order (number of variables), as termsform's step 3.
    ordered = sorted(kept, key=lambda t: bin(t).count("1"))
    term_vars = []
    term_codes = []
    term_labels = []
    for pos, term in enumerate(ordered):
        idx = tuple(i for i in range(len(variables)) if term >> i & 1)
        term_vars.append(idx)
        term_codes.append(tuple(_term_code(ordered, pos, 1 << i) for i in idx))
        term_labels.append(":".join(labels[i] for i in idx))
    model_terms = ModelTerms(
        variables=variables,
        labels=labels,
        terms=tuple(term_vars),
        codes=tuple(term_codes),
        term_labels=tuple(term_labels),
        intercept=bool(expander.intercept),
        offsets=tuple(offsets),
        has_response=response is not None,
    )
    return model_terms, tuple(warnings)

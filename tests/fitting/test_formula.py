"""Tests of fitting.formula: the safe parser, R's term expansion and naming.

Expected term labels are R facts (``attr(terms(f), "term.labels")`` and
``attr(terms(f), "intercept")`` in R 4.x, lme4's ``findbars``/``expandSlash``), not
outputs of this code.
"""
from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitting.errors import FormulaError
from fitting.formula import ParsedFormula, formula_variables, parse_formula
from fitting.formula_nodes import Binary, Call, Name, Number, Paren, Unary, deparse, format_r_number


def labels(text: str) -> tuple[str, ...]:
    return parse_formula(text).fixed.term_labels


# ------------------------------------------------------------------ term expansion
@pytest.mark.parametrize(
    "text, expected",
    [
        ("y ~ a", ("a",)),
        ("y ~ a + b", ("a", "b")),
        ("y ~ a*b", ("a", "b", "a:b")),
        ("y ~ a*b*c", ("a", "b", "c", "a:b", "a:c", "b:c", "a:b:c")),
        ("y ~ a/b", ("a", "a:b")),
        ("y ~ (a + b)/c", ("a", "b", "a:b:c")),
        ("y ~ (a + b + c)^2", ("a", "b", "c", "a:b", "a:c", "b:c")),
        ("y ~ (a + b):c", ("a:c", "b:c")),
        ("y ~ a:b + a + b", ("a", "b", "a:b")),  # sorted by order, stable
        ("y ~ b:a + a", ("a", "b:a")),  # labels follow variable (first appearance) order
        ("y ~ a + a", ("a",)),
        ("y ~ a + b - b", ("a",)),
        ("y ~ a*b - a", ("b", "a:b")),
        ("y ~ a*b - a:b", ("a", "b")),
        ("y ~ a + b:c", ("a", "b:c")),  # ':' binds tighter than '+'
        ("y ~ a*b:c", ("a", "b:c", "a:b:c")),  # and tighter than '*'
        ("y ~ a:b*c", ("c", "a:b", "a:b:c")),
        ("y ~ x + I(x^2)", ("x", "I(x^2)")),
        ("y ~ x + f:x", ("x", "x:f")),
        ("y ~ f:x", ("f:x",)),
        ("y ~ x + offset(log(t))", ("x",)),
        ("y ~ 1", ()),
    ],
)
def test_term_labels_match_r(text, expected):
    assert labels(text) == expected


@pytest.mark.parametrize(
    "text, intercept",
    [
        ("y ~ x", True),
        ("y ~ 1 + x", True),
        ("y ~ x - 1", False),
        ("y ~ -1 + x", False),
        ("y ~ 0 + x", False),
        ("y ~ x + 0", False),
        ("y ~ 0 + x + 1", True),  # the last 0/1 wins, as in R's EncodeVars
        ("y ~ 0", False),
    ],
)
def test_intercept_rules(text, intercept):
    assert parse_formula(text).fixed.intercept is intercept


def test_contrast_codes_follow_r_termcode():
    # y ~ a/b: a:b codes a by indicators (b alone is not in the model) and b by contrasts.
    fixed = parse_formula("y ~ a/b").fixed
    assert fixed.codes == ((1,), (2, 1))
    # y ~ a:b: neither a nor b precedes, so both get indicator coding (R's model.matrix).
    assert parse_formula("y ~ a:b").fixed.codes == ((2, 2),)
    assert parse_formula("y ~ a*b").fixed.codes == ((1,), (1,), (1, 1))
    # TermCode tests containment, not equality: {x} is inside the preceding x:z, so f
    # in x:f is coded by contrasts.
    # (R's attr(terms(~ x:z + x:f), "factors"): x=2, z=2 | x=2, f=1)
    assert parse_formula("y ~ x:z + x:f").fixed.codes == ((2, 2), (2, 1))
    assert parse_formula("y ~ x:f").fixed.codes == ((2, 2),)


@pytest.mark.parametrize(
    "text, label",
    [
        ("y ~ I(age^2)", "I(age^2)"),
        ("y ~ I(age - 5)", "I(age - 5)"),
        ("y ~ I(a * b)", "I(a * b)"),
        ("y ~ I(a/b)", "I(a/b)"),
        ("y ~ I(a+b*c^2)", "I(a + b * c^2)"),
        ("y ~ I((a+b)^2)", "I((a + b)^2)"),
        ("y ~ I(-a^2)", "I(-a^2)"),
        ("y ~ I(2*x)", "I(2 * x)"),
        ("y ~ I(x^0.5)", "I(x^0.5)"),
        ("y ~ I(x/1e5)", "I(x/1e+05)"),
        ("y ~ I(x/1000)", "I(x/1000)"),
        ("y ~ log(x)", "log(x)"),
        ("y ~ log(x + 1)", "log(x + 1)"),
        ("y ~ scale(HEIGHT)", "scale(HEIGHT)"),
        ("y ~ sqrt(abs(x))", "sqrt(abs(x))"),
        ("y ~ `my col`", "`my col`"),
        ("y ~ `x`", "x"),  # syntactic names are deparsed without backquotes
        ("y ~ `2x`", "`2x`"),
        ("y ~ x.1_b", "x.1_b"),
    ],
)
def test_atom_names_deparse_like_r(text, label):
    assert labels(text) == (label,)


def test_response_label_and_tree():
    parsed = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)")
    assert parsed.response_label == "cbind(incidence, size - incidence)"
    assert parsed.response == Call("cbind", (Name("incidence"), Binary("-", Name("size"), Name("incidence"))))


def test_precedence_in_the_tree():
    var = parse_formula("y ~ I(a + b * c^-d)").fixed.variables[1]
    expected = Call(
        "I",
        (Binary("+", Name("a"), Binary("*", Name("b"), Binary("^", Name("c"), Unary("-", Name("d"))))),),
    )
    assert var == expected
    # '^' is right associative; unary minus binds looser than '^'.
    assert parse_formula("y ~ I(a^b^c)").fixed.variables[1].args[0] == Binary(
        "^", Name("a"), Binary("^", Name("b"), Name("c"))
    )
    assert parse_formula("y ~ I(-a^2)").fixed.variables[1].args[0] == Unary(
        "-", Binary("^", Name("a"), Number(2.0))
    )
    assert parse_formula("y ~ I((a))").fixed.variables[1].args[0] == Paren(Name("a"))


def test_structurally_equal_atoms_are_one_variable():
    assert labels("y ~ I(x^2) + I(x ^ 2)") == ("I(x^2)",)
    assert labels("y ~ I(x^2) + I(x^2.0)") == ("I(x^2)",)


@pytest.mark.parametrize(
    "value, text",
    [(2.0, "2"), (0.5, "0.5"), (1e5, "1e+05"), (123456.0, "123456"), (1e-4, "1e-04"),
     (0.001, "0.001"), (1 / 3, "0.333333333333333"), (1e15, "1e+15"), (100000.1, "100000.1")],
)
def test_numbers_format_like_r(value, text):
    assert format_r_number(value) == text


# ------------------------------------------------------------------ random effects
def _re(text):
    return [(t.text, t.group_name, t.lhs.term_labels, t.lhs.intercept) for t in parse_formula(text).random]


def test_random_intercept_and_slopes():
    assert _re("y ~ x + (1 | g)") == [("(1 | g)", "g", (), True)]
    assert _re("y ~ x + (x | g)") == [("(x | g)", "g", ("x",), True)]
    assert _re("y ~ x + (0 + x | g)") == [("(0 + x | g)", "g", ("x",), False)]
    assert _re("y ~ x + (urban | district)") == [("(urban | district)", "district", ("urban",), True)]


def test_double_bar_expands_to_independent_terms():
    # lme4's expandDoubleVerts: (1 | g) + (0 + x | g) + (0 + z | g)
    assert _re("y ~ (1 + x + z || g)") == [
        ("(1 | g)", "g", (), True),
        ("(0 + x | g)", "g", ("x",), False),
        ("(0 + z | g)", "g", ("z",), False),
    ]
    assert _re("y ~ (0 + x || g)") == [("(0 + x | g)", "g", ("x",), False)]


def test_crossed_terms_stay_separate_in_formula_order():
    assert [t[1] for t in _re("y ~ (1 | b) + (1 | a) + (1 | c)")] == ["b", "a", "c"]


def test_nested_grouping_expands_like_lme4():
    assert [t[1] for t in _re("y ~ (1 | a/b)")] == ["b:a", "a"]
    assert [t[1] for t in _re("y ~ (1 | a:b)")] == ["a:b"]
    # R's deparse parenthesises a right-nested ':' (lme4 builds c:(b:a) for a/b/c).
    assert [t[1] for t in _re("y ~ (1 | a/b/c)")] == ["c:(b:a)", "b:a", "a"]
    assert [t[0] for t in _re("y ~ (x || a/b)")] == [
        "(1 | b:a)", "(1 | a)", "(0 + x | b:a)", "(0 + x | a)"
    ]


def test_fixed_part_without_bars():
    parsed = parse_formula("y ~ (1 | g)")
    assert parsed.fixed.intercept and parsed.fixed.terms == ()
    assert not parse_formula("y ~ 0 + (1 | g)").fixed.intercept
    parsed = parse_formula("y ~ x + (1 | g) - 1")
    assert parsed.fixed.term_labels == ("x",) and not parsed.fixed.intercept
    assert parse_formula("y ~ x + ((1 | g))").random[0].group_name == "g"


def test_response_on_rhs_is_dropped_with_warning():
    parsed = parse_formula("y ~ y + x")
    assert parsed.fixed.term_labels == ("x",)
    assert "response 'y'" in parsed.warnings[0]


# ------------------------------------------------------------------ variables
def test_formula_variables_by_role():
    got = formula_variables(
        "cbind(s, n - s) ~ x + log(w) + offset(log(t)) + (z | g) + (1 | a/b)"
    )
    assert got == {
        "response": ("n", "s"),
        "fixed": ("w", "x"),
        "random": ("z",),
        "grouping": ("a", "b", "g"),
        "offset": ("t",),
    }
    cbpp = formula_variables(parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)"))
    assert cbpp == {
        "response": ("incidence", "size"),
        "fixed": ("period",),
        "random": (),
        "grouping": ("herd",),
        "offset": (),
    }
    assert formula_variables("y ~ `my col` + x")["fixed"] == ("my col", "x")


def test_columns_in_order_of_appearance():
    parsed = parse_formula("TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX)")
    assert parsed.columns == ("TICKS", "YEAR", "HEIGHT", "BROOD", "INDEX")


# ------------------------------------------------------------------ caching / immutability
def test_parse_is_cached_and_immutable():
    text = "y ~ a*b + (1 | g)"
    first = parse_formula(text)
    assert parse_formula(text) is first
    assert isinstance(first, ParsedFormula)
    hash(first)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.text = "z ~ 1"  # type: ignore[misc]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "text, fragments",
    [
        ("y ~ x + )", ["unexpected ')' at position 8 in formula 'y ~ x + )'"]),
        ("y x", ["no '~'"]),
        ("y ~ ", ["empty right-hand side"]),
        ("~ x", ["no response"]),
        ("y ~ x | g", ["unexpected '|' at position 6", "only allowed inside parentheses"]),
        ("y ~ (x + z", ["unbalanced parentheses", "position 4"]),
        ("y ~ x + z)", ["unexpected ')'", "unbalanced"]),
        ("y ~ foo(x)", ["unknown function 'foo'", "allowed: I, abs, cbind, center"]),
        ("y ~ x + 2", ["invalid model term '2'", "position 8"]),
        ("y ~ x ~ z", ["unexpected '~'"]),
        ("y ~ log(x, 2)", ["log() takes 1 argument"]),
        ("y ~ I(a:b)", ["operator ':' is not allowed inside I(...)"]),
        ("y ~ x + cbind(a, b)", ["cbind() is only allowed as the response"]),
        ("y ~ I(offset(z))", ["offset() cannot be used inside I(...)"]),
        ("y ~ x + (1 + offset(z) | g)", ["offset() is not allowed inside a random-effects term"]),
        ("y ~ x * (1 | g)", ["can only be added with '+'"]),
        ("y ~ x - (1 | g)", ["cannot be removed"]),
        ("y ~ .", ["'.'"]),
        ("y ~ `x", ["unterminated backquoted name"]),
        ("y ~ x $ z", ["unexpected character '$' at position 6"]),
        ("y ~ x + \"a\"", ["unexpected character '\"'"]),
        ("y ~ (a + b)^x", ["invalid power"]),
        ("y ~ (a + b)^1", ["invalid power"]),
        ("y ~ (a + b)^2.5", ["invalid power"]),
        ("y ~ (1 | g + h)", ["invalid grouping factor 'g + h'"]),
        ("y ~ (1 | log(g))", ["invalid grouping factor 'log(g)'"]),
        ("y ~ (0 | g)", ["has no columns"]),
        ("y ~ ()", ["empty parentheses"]),
        ("(1 | g) ~ x", ["response"]),
        ("a:b ~ x", ["':' is not allowed in the response"]),
        ("y ~ x + _z", ["unexpected character '_'"]),
    ],
)
def test_parse_errors_name_the_culprit(text, fragments):
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_non_string_formula():
    with pytest.raises(FormulaError, match="must be a string"):
        parse_formula(42)  # type: ignore[arg-type]


def test_deep_nesting_and_long_formulas_are_formula_errors():
    with pytest.raises(FormulaError, match="nested too deeply"):
        parse_formula("y ~ " + "(" * 300 + "x" + ")" * 300)
    with pytest.raises(FormulaError, match="nested too deeply"):
        parse_formula("y ~ " + "-" * 300 + "x")
    with pytest.raises(FormulaError):
        parse_formula("y ~ " + " + ".join(f"x{i}" for i in range(2000)))
    # a realistic wide formula is fine
    assert len(labels("y ~ " + " + ".join(f"x{i}" for i in range(100)))) == 100


# ------------------------------------------------------------------ property tests
_FORMULA_ALPHABET = "yxzgab~+-*/^:|()` ,.01259eIlogscaleptfcbind\\$%\"'_"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_FORMULA_ALPHABET, max_size=40))
def test_junk_in_formula_alphabet_only_raises_formula_error(text):
    try:
        parsed = parse_formula(text)
    except FormulaError:
        return
    # whatever parses must be fully usable
    formula_variables(parsed)
    deparse(parsed.rhs)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_unicode_junk_only_raises_formula_error(text):
    try:
        parse_formula(text)
    except FormulaError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["y", "~", "x", "g", "(", ")", "|", "||", "+", "-", "*", "/", "^", ":", "0", "1",
                         "2", "I(", "log(", "offset(", "cbind(", ",", "`a b`"]),
        max_size=25,
    )
)
def test_token_soup_only_raises_formula_error(tokens):
    text = " ".join(tokens)
    try:
        parse_formula(text)
    except FormulaError:
        pass


def test_printable_ascii_single_characters():
    for ch in string.printable:
        try:
            parse_formula(f"y ~ x {ch} z")
        except FormulaError:
            pass

"""The TOML job spec: parse, check its structure, and validate it against the data.

A job spec says which dataset to read, which model to fit, and how to split the data
into strata::

    name = "remission-by-region"
    dataset = "data/hospitals/"
    formula = "remission ~ Age + Married + IL6 + (1 | DID)"
    family = "binomial"
    strata = ["region"]
    filters = [["year", ">=", 2020]]

    [control]
    maxiter = 500

Two stages, each callable alone:

* :func:`load_spec` (structure only, no I/O besides reading the TOML file): unknown or
  missing keys, wrong types, bad family/link/method values → :class:`SpecError`.
* :func:`validate_spec` (opens the dataset's metadata, parses the formula): every column
  the spec names exists and has a usable type → :class:`SpecReport`.

Every error is a :class:`SpecError` naming the spec field and the culprit, e.g.
``spec field 'family': unknown family 'binomal'; did you mean 'binomial'? (valid:
gaussian, binomial, poisson)``.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

__all__ = [
    "SpecError",
    "JobSpec",
    "SpecReport",
    "load_spec",
    "validate_spec",
    "used_columns",
    "FAMILY_LINKS",
    "METHODS",
    "FILTER_OPS",
]

#: Allowed links per family; the first one is the default (canonical) link.
FAMILY_LINKS: dict[str, tuple[str, ...]] = {
    "gaussian": ("identity",),
    "binomial": ("logit", "probit", "cloglog"),
    "poisson": ("log",),
}

#: Estimation methods for the GLMM objective.
METHODS: tuple[str, ...] = ("laplace", "agq")

#: Comparison operators allowed in ``filters`` triples.
FILTER_OPS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")

_REQUIRED = ("name", "dataset", "formula")
_KEYS = (
    "name",
    "dataset",
    "formula",
    "family",
    "link",
    "strata",
    "method",
    "nagq",
    "reml",
    "weights",
    "offset",
    "filters",
    "store_random_effects",
    "max_task_seconds",
    "control",
)


class SpecError(ValueError):
    """A job spec is malformed or does not fit its dataset.

    Parameters
    ----------
    field : str or None
        The spec field at fault (``None`` for file-level errors such as TOML syntax).
    message : str
        What is wrong, naming the culprit value or column.
    """

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        text = f"spec field {field!r}: {message}" if field else f"spec: {message}"
        super().__init__(text)

    def __reduce__(self):  # keep picklable across processes (Dask)
        return (type(self), (self.field, self.message))


def _near(value: str, options: Any) -> str:
    """``"; did you mean 'x'?"`` when ``value`` is close to one of ``options``."""
    near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


@dataclass(frozen=True)
class JobSpec:
    """A structurally valid job spec (see the module docstring for the TOML form).

    Attributes
    ----------
    name : str
        Job name.
    dataset : str
        Parquet file, folder, glob or URI (relative paths resolved against the TOML
        file's folder by :func:`load_spec`).
    formula : str
        lme4-style model formula.
    family, link : str
        Family and link (``link`` defaults to the family's canonical link).
    strata : tuple of str
        Columns whose distinct value combinations are fitted independently.
    method : str
        ``"laplace"`` or ``"agq"``.
    nagq : int, "auto" or None
        Quadrature points; only with ``method="agq"`` (default ``"auto"`` then).
    reml : bool
        REML estimation (Gaussian only).
    weights, offset : str or None
        Column names.
    filters : tuple of tuple
        ``(column, op, value)`` triples; ``value`` is a tuple for ``in``/``not in``.
        Dates and datetimes are stored as ISO strings and cast to the column's type.
    store_random_effects : bool
        Store conditional modes of the random effects.
    max_task_seconds : float or None
        Planner knob: rough wall time per task.
    control : dict
        Passed through to ``fitting.fit(control=...)``.
    raw : dict
        The mapping as given (not part of :meth:`to_dict` or :attr:`spec_hash`).
    """

    name: str
    dataset: str
    formula: str
    family: str = "gaussian"
    link: str = "identity"
    strata: tuple[str, ...] = ()
    method: str = "laplace"
    nagq: int | str | None = None
    reml: bool = False
    weights: str | None = None
    offset: str | None = None
    filters: tuple[tuple[Any, ...], ...] = ()
    store_random_effects: bool = True
    max_task_seconds: float | None = None
    control: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-serialisable form; ``load_spec(spec.to_dict())`` round-trips.

        Returns
        -------
        dict
        """
        return {
            "name": self.name,
            "dataset": self.dataset,
            "formula": self.formula,
            "family": self.family,
            "link": self.link,
            "strata": list(self.strata),
            "method": self.method,
            "nagq": self.nagq,
            "reml": self.reml,
            "weights": self.weights,
            "offset": self.offset,
            "filters": [
                [c, op, list(v) if isinstance(v, tuple) else v] for c, op, v in self.filters
            ],
            "store_random_effects": self.store_random_effects,
            "max_task_seconds": self.max_task_seconds,
            "control": _jsonable(self.control),
        }

    @property
    def spec_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of :meth:`to_dict` with sorted keys."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fitting.fit` (all but ``data``).

        Includes ``formula``, so ``fitting.fit(data=df, **spec.fit_kwargs())`` works.
        ``nagq`` goes into ``control["nagq"]`` when ``method == "agq"``.

        Returns
        -------
        dict
            ``formula, family, link, weights, offset, reml, method, control``.
        """
        control = dict(self.control)
        if self.method == "agq" and self.nagq is not None:
            control["nagq"] = self.nagq
        return {
            "formula": self.formula,
            "family": self.family,
            "link": self.link,
            "weights": self.weights,
            "offset": self.offset,
            "reml": self.reml,
            "method": self.method,
            "control": control,
        }


@dataclass(frozen=True)
class SpecReport:
    """What :func:`validate_spec` learned from the dataset.

    Attributes
    ----------
    schema : pyarrow.Schema
        Dataset schema, partition columns included.
    n_files : int
        Parquet files in the dataset.
    strata_columns : tuple of str
        The spec's strata columns.
    used_columns : tuple of str
        Columns a worker must read to fit a stratum (formula variables, weights,
        offset, strata columns), in schema order.
    dataset : service.dataset.DatasetHandle or None
        The dataset as opened for the validation, with what its footers told
        (:attr:`~service.dataset.DatasetHandle.footers`: row counts, row-group
        statistics of the strata columns); planning the job right after can use it
        instead of opening the dataset and reading every footer again.
    """

    schema: pa.Schema
    n_files: int
    strata_columns: tuple[str, ...]
    used_columns: tuple[str, ...]
    dataset: Any = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- load


def _jsonable(value: Any) -> Any:
    """Canonical JSON form of a TOML value (dates/times → ISO strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    return value


def _type_name(value: Any) -> str:
    names = {str: "string", bool: "boolean", int: "integer", float: "float",
             list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _want_str(key: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(key, f"expected a string, got {_type_name(value)} {value!r}")
    if not empty and not value.strip():
        raise SpecError(key, "must not be empty")
    return value


def _want_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(key, f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def _choice(key: str, value: Any, valid: tuple[str, ...], what: str) -> str:
    _want_str(key, value)
    low = value.lower()
    if low not in valid:
        raise SpecError(
            key, f"unknown {what} {value!r}{_near(low, valid)} (valid: {', '.join(valid)})"
        )
    return low


def _filter_value(index: int, value: Any) -> Any:
    key = f"filters[{index}]"
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(key, f"value {value!r} is not finite")
    if isinstance(value, (str, int, float, bool)):
        return value
    raise SpecError(
        key, f"value must be a string, number, boolean or date, got {_type_name(value)} {value!r}"
    )


def _parse_filters(value: Any) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(value, list):
        raise SpecError("filters", f"expected an array of [column, op, value], got {value!r}")
    out = []
    for i, item in enumerate(value):
        key = f"filters[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise SpecError(key, f"expected [column, op, value], got {item!r}")
        column, op, val = item
        if not isinstance(column, str) or not column:
            raise SpecError(key, f"column must be a non-empty string, got {column!r}")
        if not isinstance(op, str) or op.strip().lower() not in FILTER_OPS:
            raise SpecError(
                key,
                f"unknown operator {op!r}{_near(str(op), FILTER_OPS)} "
                f"(valid: {', '.join(FILTER_OPS)})",
            )
        op = " ".join(op.strip().lower().split())
        if op in ("in", "not in"):
            if not isinstance(val, (list, tuple)) or not val:
                raise SpecError(key, f"operator {op!r} needs a non-empty array, got {val!r}")
            canon: Any = tuple(_filter_value(i, v) for v in val)
        else:
            if isinstance(val, (list, tuple)):
                raise SpecError(key, f"operator {op!r} needs a single value, got {val!r}")
            canon = _filter_value(i, val)
        out.append((column, op, canon))
    return tuple(out)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SpecError(None, f"spec file {path!r} not found") from None
    except IsADirectoryError:
        raise SpecError(None, f"spec path {path!r} is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(None, f"invalid TOML in {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(None, f"spec file {path!r} is not UTF-8 text: {exc}") from None


def _resolve_dataset(dataset: str, base_dir: str | os.PathLike | None) -> str:
    if "://" in dataset or base_dir is None:
        return dataset
    expanded = os.path.expanduser(dataset)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    return os.path.normpath(os.path.join(os.fspath(base_dir), expanded))


def load_spec(
    source: str | os.PathLike | Mapping[str, Any], *, base_dir: str | os.PathLike | None = None
) -> JobSpec:
    """Load and structurally check a job spec.

    Parameters
    ----------
    source : str, path-like or mapping
        Path of a TOML file, or an already-parsed mapping (Python API). TOML *text* is
        not accepted (parse it with :func:`tomllib.loads` and pass the dict).
    base_dir : str or path-like, optional
        Folder against which a relative ``dataset`` is resolved. Defaults to the TOML
        file's folder, and for a mapping to the current working directory (so a stored
        spec never depends on the cwd of the process that runs it). URIs
        (``s3://...``) are never resolved.

    Returns
    -------
    JobSpec

    Raises
    ------
    SpecError
        Unreadable/invalid TOML (with line and column), unknown keys (with the nearest
        valid name), missing required keys, wrong types, bad family/link/method/nagq,
        or option combinations that cannot work (``reml`` with a non-Gaussian family,
        ``nagq`` without ``method="agq"``).
    """
    if isinstance(source, Mapping):
        raw = dict(source)
        if base_dir is None:
            base_dir = os.getcwd()
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        looks_like_toml = "\n" in path or ("=" in path and '"' in path)
        if isinstance(source, str) and looks_like_toml and not os.path.exists(path):
            raise SpecError(
                None,
                "load_spec takes a path to a TOML file, not TOML text; "
                "parse text with tomllib.loads and pass the dict",
            )
        raw = _read_toml(path)
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise SpecError(None, f"expected a TOML file path or a mapping, got {type(source).__name__}")
    return _build_spec(raw, base_dir)


def _build_spec(raw: dict[str, Any], base_dir: str | os.PathLike | None) -> JobSpec:
    for key in raw:
        if key not in _KEYS:
            raise SpecError(str(key), f"unknown key{_near(str(key), _KEYS)} (valid keys: {', '.join(_KEYS)})")
    for key in _REQUIRED:
        if key not in raw or raw[key] is None:
            raise SpecError(key, "required key is missing")

    name = _want_str("name", raw["name"])
    dataset = _resolve_dataset(_want_str("dataset", raw["dataset"]), base_dir)
    formula = _want_str("formula", raw["formula"])
    if "~" not in formula:
        raise SpecError("formula", f"expected 'response ~ terms', got {formula!r}")

    family = _choice("family", raw.get("family", "gaussian"), tuple(FAMILY_LINKS), "family")
    links = FAMILY_LINKS[family]
    link_raw = raw.get("link")
    if link_raw is None:
        link = links[0]
    else:
        _want_str("link", link_raw)
        link = link_raw.lower()
        if link not in links:
            all_links = sorted({lk for ls in FAMILY_LINKS.values() for lk in ls})
            what = "unknown link" if link not in all_links else f"link not allowed for family {family!r}:"
            raise SpecError(
                "link",
                f"{what} {link_raw!r}{_near(link, links)} (valid for {family}: {', '.join(links)})",
            )

    strata_raw = raw.get("strata", [])
    if isinstance(strata_raw, str):
        strata_raw = [strata_raw]
    if not isinstance(strata_raw, (list, tuple)):
        raise SpecError("strata", f"expected an array of column names, got {strata_raw!r}")
    for s in strata_raw:
        if not isinstance(s, str) or not s:
            raise SpecError("strata", f"column names must be non-empty strings, got {s!r}")
    dupes = sorted({s for s in strata_raw if list(strata_raw).count(s) > 1})
    if dupes:
        raise SpecError("strata", f"column(s) listed twice: {', '.join(dupes)}")
    strata = tuple(strata_raw)

    method = _choice("method", raw.get("method", "laplace"), METHODS, "method")
    nagq = raw.get("nagq")
    if nagq is not None:
        if method != "agq":
            raise SpecError("nagq", 'only allowed with method = "agq"')
        if isinstance(nagq, str):
            if nagq.lower() != "auto":
                raise SpecError("nagq", f'expected an integer >= 1 or "auto", got {nagq!r}')
            nagq = "auto"
        elif isinstance(nagq, bool) or not isinstance(nagq, int) or nagq < 1:
            raise SpecError("nagq", f'expected an integer >= 1 or "auto", got {nagq!r}')
    elif method == "agq":
        nagq = "auto"
    if method == "agq" and family == "gaussian":
        raise SpecError("method", 'method "agq" applies to binomial and poisson families only')

    reml = _want_bool("reml", raw.get("reml", False))
    if reml and family != "gaussian":
        raise SpecError("reml", f"REML is only defined for the gaussian family, not {family!r}")

    weights = raw.get("weights")
    if weights is not None:
        _want_str("weights", weights)
    offset = raw.get("offset")
    if offset is not None:
        _want_str("offset", offset)

    filters = _parse_filters(raw.get("filters", []))
    store_re = _want_bool("store_random_effects", raw.get("store_random_effects", True))

    mts = raw.get("max_task_seconds")
    if mts is not None:
        if isinstance(mts, bool) or not isinstance(mts, (int, float)) or not math.isfinite(mts) or mts <= 0:
            raise SpecError("max_task_seconds", f"expected a positive number, got {mts!r}")
        mts = float(mts)

    control = raw.get("control", {})
    if control is None:
        control = {}
    if not isinstance(control, Mapping):
        raise SpecError("control", f"expected a table, got {_type_name(control)} {control!r}")
    control = _jsonable(control)
    try:
        json.dumps(control, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpecError("control", f"values must be JSON-serialisable: {exc}") from None

    return JobSpec(
        name=name,
        dataset=dataset,
        formula=formula,
        family=family,
        link=link,
        strata=strata,
        method=method,
        nagq=nagq,
        reml=reml,
        weights=weights,
        offset=offset,
        filters=filters,
        store_random_effects=store_re,
        max_task_seconds=mts,
        control=control,
        raw=raw,
    )


# ----------------------------------------------------------------------- validate


def _formula_variables(spec: JobSpec) -> dict[str, tuple[str, ...]]:
    """Parse the formula; wrap parse errors as ``SpecError(field="formula")``."""
    from fitting.errors import FittingError
    from fitting.formula import formula_variables, parse_formula

    try:
        parsed = parse_formula(spec.formula)
        variables = formula_variables(parsed)
    except FittingError as exc:
        text = str(exc)
        if spec.formula not in text:
            text += f" (formula: {spec.formula!r})"
        raise SpecError("formula", text) from None
    return {k: tuple(v) for k, v in dict(variables).items()}


def used_columns(spec: JobSpec, schema: pa.Schema | None = None) -> tuple[str, ...]:
    """Columns a worker reads to fit one stratum.

    Parameters
    ----------
    spec : JobSpec
    schema : pyarrow.Schema, optional
        When given, the result is in schema order (else formula order).

    Returns
    -------
    tuple of str
        Formula variables (response, fixed, random, grouping, offset), ``weights``,
        ``offset`` and the strata columns, without duplicates.

    Raises
    ------
    SpecError
        The formula does not parse (``field="formula"``).
    """
    variables = _formula_variables(spec)
    names: list[str] = []
    for part in ("response", "fixed", "random", "grouping", "offset"):
        names.extend(variables.get(part, ()))
    names.extend(c for c in (spec.weights, spec.offset) if c)
    names.extend(spec.strata)
    unique = list(dict.fromkeys(names))
    if schema is not None:
        order = {n: i for i, n in enumerate(schema.names)}
        unique.sort(key=lambda n: order.get(n, len(order)))
    return tuple(unique)


def _is_groupable(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_groupable(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or getattr(pa.types, "is_string_view", lambda _t: False)(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_date(t)
    )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _missing(field_name: str, column: str, schema: pa.Schema, dataset: str, what: str = "") -> SpecError:
    hint = difflib.get_close_matches(column, schema.names, n=1, cutoff=0.6)
    near = f" (did you mean {hint[0]!r}?)" if hint else ""
    return SpecError(field_name, f"unknown column {column!r}{what} in dataset {dataset}{near}")


def validate_spec(spec: JobSpec, *, check_files: bool = True) -> SpecReport:
    """Check a spec against its dataset's metadata (never reads the data itself).

    Parameters
    ----------
    spec : JobSpec
    check_files : bool, default True
        Read every Parquet footer (metadata only) so a corrupt file, or a file lacking
        a used column, is reported now, by name, instead of failing a task later.

    Returns
    -------
    SpecReport

    Raises
    ------
    SpecError
        ``field="dataset"`` (not found, no Parquet files, corrupt file),
        ``"formula"`` (parse error, unknown column, non-numeric response for
        gaussian/poisson, AGQ with a non-scalar random effect), ``"strata"``
        (unknown column, type not groupable), ``"weights"``/``"offset"`` (unknown or
        non-numeric column), ``"filters[i]"`` (unknown column, value not comparable).
    """
    from service.dataset import DatasetError, open_dataset

    try:
        handle = open_dataset(spec.dataset)
    except DatasetError as exc:
        raise SpecError("dataset", str(exc)) from None
    schema = handle.schema
    names = set(schema.names)

    variables = _formula_variables(spec)
    for part in ("response", "fixed", "random", "grouping", "offset"):
        for column in variables.get(part, ()):
            if column not in names:
                raise _missing("formula", column, schema, spec.dataset)
    if spec.family in ("gaussian", "poisson"):
        for column in variables.get("response", ()):
            t = schema.field(column).type
            if not _is_numeric(t):
                raise SpecError(
                    "formula",
                    f"response column {column!r} has type {t}; family {spec.family!r} needs a numeric column",
                )
    if spec.method == "agq" and isinstance(spec.nagq, int) and spec.nagq > 1:
        if len(variables.get("grouping", ())) > 1:
            raise SpecError(
                "nagq",
                "adaptive Gauss-Hermite quadrature with nagq > 1 needs a single grouping "
                f"factor (e.g. '(1 | g)' or '(1 + x | g)'); formula {spec.formula!r} has "
                f"{', '.join(variables['grouping'])}",
            )

    for column in spec.strata:
        if column not in names:
            raise _missing("strata", column, schema, spec.dataset)
        t = schema.field(column).type
        if not _is_groupable(t):
            raise SpecError(
                "strata",
                f"column {column!r} has type {t}, which cannot define strata "
                "(use a string, integer, boolean, dictionary or date column)",
            )

    for key in ("weights", "offset"):
        column = getattr(spec, key)
        if column is None:
            continue
        if column not in names:
            raise _missing(key, column, schema, spec.dataset)
        t = schema.field(column).type
        if not _is_numeric(t):
            raise SpecError(key, f"column {column!r} has type {t}; expected a numeric column")

    _validate_filters(spec, schema)
    used = used_columns(spec, schema)
    if check_files:
        try:
            part = set(handle.partition_columns)
            handle.validate(columns=used,
                            stats_columns=[c for c in spec.strata if c not in part])
        except DatasetError as exc:
            raise SpecError("dataset", str(exc)) from None
    return SpecReport(
        schema=schema,
        n_files=len(handle.files),
        strata_columns=spec.strata,
        used_columns=used,
        dataset=handle,
    )


def _validate_filters(spec: JobSpec, schema: pa.Schema) -> None:
    """Each filter's column exists and the comparison evaluates for the column's type."""
    from service.dataset import DatasetError, filter_expression

    for i, (column, op, value) in enumerate(spec.filters):
        key = f"filters[{i}]"
        if column not in schema.names:
            raise _missing(key, column, schema, spec.dataset)
        field_ = schema.field(column)
        if op in ("<", "<=", ">", ">="):
            t = field_.type.value_type if pa.types.is_dictionary(field_.type) else field_.type
            if not (_is_numeric(t) or pa.types.is_temporal(t) or pa.types.is_string(t)
                    or pa.types.is_large_string(t)):
                raise SpecError(key, f"operator {op!r} cannot order column {column!r} of type {field_.type}")
        try:
            expr = filter_expression([(column, op, value)], schema)
            pa.schema([field_]).empty_table().filter(expr)
        except (DatasetError, pa.ArrowException, TypeError, ValueError) as exc:
            detail = exc.args[0] if isinstance(exc, DatasetError) and exc.args else exc
            raise SpecError(
                key, f"cannot compare column {column!r} ({field_.type}) {op} {value!r}: {detail}"
            ) from None

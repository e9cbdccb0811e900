"""Tests of :mod:`service.spec`: structure (load_spec) and data checks (validate_spec)."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import pickle
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.spec import JobSpec, SpecError, load_spec, validate_spec

FULL_TOML = textwrap.dedent(
    """\
    name = "remission-by-region"
    dataset = "data/hospitals/"
    formula = "remission ~ Age + Married + IL6 + (1 | DID)"
    family = "binomial"
    link = "probit"
    strata = ["region"]
    method = "agq"
    nagq = 7
    weights = "w"
    offset = "log_exposure"
    filters = [["year", ">=", 2020], ["region", "in", ["north", "south"]], ["day", "<", 2021-01-31]]
    store_random_effects = false
    max_task_seconds = 2

    [control]
    maxiter = 500
    tol = 1e-8
    """
)

BASE = {"name": "job", "dataset": "/data/x.parquet", "formula": "y ~ x + (1 | g)"}


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ load_spec


def test_full_spec_fields(tmp_path):
    path = write(tmp_path, FULL_TOML)
    spec = load_spec(path)
    assert spec.name == "remission-by-region"
    assert spec.dataset == os.path.join(str(tmp_path), "data", "hospitals")
    assert spec.family == "binomial" and spec.link == "probit"
    assert spec.strata == ("region",)
    assert spec.method == "agq" and spec.nagq == 7
    assert spec.reml is False
    assert spec.weights == "w" and spec.offset == "log_exposure"
    assert spec.filters == (
        ("year", ">=", 2020),
        ("region", "in", ("north", "south")),
        ("day", "<", "2021-01-31"),  # TOML date -> ISO string
    )
    assert spec.store_random_effects is False
    assert spec.max_task_seconds == 2.0
    assert spec.control == {"maxiter": 500, "tol": 1e-8}
    assert spec.raw["filters"][2][2] == dt.date(2021, 1, 31)


def test_defaults():
    spec = load_spec(dict(BASE))
    assert (spec.family, spec.link, spec.method, spec.nagq) == ("gaussian", "identity", "laplace", None)
    assert spec.strata == () and spec.filters == () and spec.control == {}
    assert spec.store_random_effects is True and spec.max_task_seconds is None
    assert load_spec({**BASE, "family": "poisson"}).link == "log"
    assert load_spec({**BASE, "family": "binomial"}).link == "logit"
    assert load_spec({**BASE, "family": "binomial", "method": "agq"}).nagq == "auto"


def test_round_trip_and_hash(tmp_path):
    spec = load_spec(write(tmp_path, FULL_TOML))
    again = load_spec(spec.to_dict())
    assert again == spec
    assert again.spec_hash == spec.spec_hash
    assert again.to_dict() == spec.to_dict()
    import json

    json.dumps(spec.to_dict(), allow_nan=False)  # JSON-serialisable


def test_hash_pinned_and_order_independent():
    spec = load_spec({"formula": BASE["formula"], "dataset": BASE["dataset"], "name": "job"})
    # canonical JSON of the defaults; a change here invalidates stored spec hashes
    canonical = (
        '{"control":{},"dataset":"/data/x.parquet","family":"gaussian","filters":[],'
        '"formula":"y ~ x + (1 | g)","link":"identity","max_task_seconds":null,'
        '"method":"laplace","nagq":null,"name":"job","offset":null,"reml":false,'
        '"store_random_effects":true,"strata":[],"weights":null}'
    )
    assert spec.spec_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert spec.spec_hash == "7a310489ddb817e5602e43ac5a9ec2bf806194ebf4624626e8bac6da860fa03b"
    # explicit defaults hash like omitted ones
    explicit = load_spec({**BASE, "family": "gaussian", "link": "identity", "strata": [],
                          "method": "laplace", "reml": False, "store_random_effects": True})
    assert explicit.spec_hash == spec.spec_hash


@pytest.mark.parametrize(
    "change",
    [
        {"formula": "y ~ x + z + (1 | g)"},
        {"family": "poisson"},
        {"strata": ["g"]},
        {"filters": [["x", ">", 1]]},
        {"filters": [["x", ">", 2]]},
        {"control": {"maxiter": 10}},
        {"dataset": "/data/y.parquet"},
        {"store_random_effects": False},
        {"max_task_seconds": 3.0},
    ],
)
def test_hash_sensitive(change):
    assert load_spec({**BASE, **change}).spec_hash != load_spec(dict(BASE)).spec_hash


@pytest.mark.parametrize(
    "raw, field, fragment",
    [
        ({"dataset": "d", "formula": "y ~ x"}, "name", "required key is missing"),
        ({"name": "n", "formula": "y ~ x"}, "dataset", "required key is missing"),
        ({"name": "n", "dataset": "d"}, "formula", "required key is missing"),
        ({**BASE, "familly": "poisson"}, "familly", "did you mean 'family'?"),
        ({**BASE, "name": 3}, "name", "expected a string, got integer 3"),
        ({**BASE, "name": "  "}, "name", "must not be empty"),
        ({**BASE, "formula": "y + x"}, "formula", "expected 'response ~ terms'"),
        ({**BASE, "family": "binomal"}, "family",
         "unknown family 'binomal'; did you mean 'binomial'? (valid: gaussian, binomial, poisson)"),
        ({**BASE, "family": "binomial", "link": "log"}, "link",
         "link not allowed for family 'binomial': 'log'"),
        ({**BASE, "family": "binomial", "link": "logti"}, "link", "did you mean 'logit'?"),
        ({**BASE, "method": "laplce"}, "method", "did you mean 'laplace'? (valid: laplace, agq)"),
        ({**BASE, "family": "binomial", "nagq": 5}, "nagq", 'only allowed with method = "agq"'),
        ({**BASE, "family": "binomial", "method": "agq", "nagq": 0}, "nagq", "integer >= 1"),
        ({**BASE, "family": "binomial", "method": "agq", "nagq": "many"}, "nagq", '"auto"'),
        ({**BASE, "method": "agq"}, "method", "binomial and poisson families only"),
        ({**BASE, "family": "poisson", "reml": True}, "reml", "gaussian family"),
        ({**BASE, "reml": "yes"}, "reml", "expected true or false"),
        ({**BASE, "strata": [1]}, "strata", "non-empty strings"),
        ({**BASE, "strata": ["a", "a"]}, "strata", "listed twice: a"),
        ({**BASE, "strata": {"a": 1}}, "strata", "expected an array"),
        ({**BASE, "weights": 1.5}, "weights", "expected a string"),
        ({**BASE, "offset": ["o"]}, "offset", "expected a string"),
        ({**BASE, "filters": "x > 1"}, "filters", "expected an array"),
        ({**BASE, "filters": [["x", ">"]]}, "filters[0]", "expected [column, op, value]"),
        ({**BASE, "filters": [["x", "=>", 1]]}, "filters[0]", "unknown operator '=>'"),
        ({**BASE, "filters": [["x", "in", 1]]}, "filters[0]", "non-empty array"),
        ({**BASE, "filters": [["x", "==", [1]]]}, "filters[0]", "single value"),
        ({**BASE, "filters": [["x", "==", {"a": 1}]]}, "filters[0]", "got table"),
        ({**BASE, "filters": [["x", ">", 1], ["y", "<", float("nan")]]}, "filters[1]", "not finite"),
        ({**BASE, "store_random_effects": 1}, "store_random_effects", "expected true or false"),
        ({**BASE, "max_task_seconds": 0}, "max_task_seconds", "positive number"),
        ({**BASE, "max_task_seconds": True}, "max_task_seconds", "positive number"),
        ({**BASE, "control": 3}, "control", "expected a table"),
    ],
)
def test_structural_errors_name_field(raw, field, fragment):
    with pytest.raises(SpecError) as info:
        load_spec(raw)
    err = info.value
    assert err.field == field
    assert fragment in err.message
    assert str(err).startswith(f"spec field '{field}': ")
    assert isinstance(err, ValueError)


def test_family_message_exact():
    with pytest.raises(SpecError) as info:
        load_spec({**BASE, "family": "binomal"})
    assert str(info.value) == (
        "spec field 'family': unknown family 'binomal'; did you mean 'binomial'? "
        "(valid: gaussian, binomial, poisson)"
    )


def test_toml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, 'name = "x"\ndataset = "d"\nformula = = "y ~ x"\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field is None
    assert "line 3" in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_toml_text_rejected(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="not TOML text"):
        load_spec('name = "x"\ndataset = "d"\nformula = "y ~ x"\n')


def test_relative_dataset_resolution(tmp_path):
    sub = tmp_path / "specs"
    sub.mkdir()
    path = write(sub, 'name = "n"\ndataset = "../data/f.parquet"\nformula = "y ~ x"\n')
    assert load_spec(path).dataset == os.path.join(str(tmp_path), "data", "f.parquet")
    assert load_spec({**BASE, "dataset": "rel/f.parquet"}).dataset == os.path.join(os.getcwd(), "rel", "f.parquet")
    assert load_spec({**BASE, "dataset": "rel/f.parquet"}, base_dir="/base").dataset == \
        os.path.normpath("/base/rel/f.parquet")
    assert load_spec({**BASE, "dataset": "s3://bucket/data"}, base_dir="/base").dataset == "s3://bucket/data"


def test_fit_kwargs():
    spec = load_spec({**BASE, "family": "binomial", "method": "agq", "nagq": 9,
                      "weights": "w", "control": {"maxiter": 5}})
    kw = spec.fit_kwargs()
    assert kw == {"formula": BASE["formula"], "family": "binomial", "link": "logit",
                  "weights": "w", "offset": None, "reml": False, "method": "agq",
                  "control": {"maxiter": 5, "nagq": 9}}
    assert spec.control == {"maxiter": 5}  # not mutated
    lap = load_spec({**BASE, "reml": True}).fit_kwargs()
    assert lap["control"] == {} and lap["reml"] is True and lap["method"] == "laplace"


def test_spec_error_pickles():
    err = pickle.loads(pickle.dumps(SpecError("strata", "bad")))
    assert (err.field, err.message, str(err)) == ("strata", "bad", "spec field 'strata': bad")


def test_jobspec_is_frozen():
    spec = load_spec(dict(BASE))
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert isinstance(spec, JobSpec)


# ------------------------------------------------------------------ validate_spec


@pytest.fixture
def hospital(tmp_path):
    """A small hive dataset with typed columns."""
    root = tmp_path / "hosp"
    for region in ("north", "south"):
        (root / f"region={region}").mkdir(parents=True)
        table = pa.table({
            "remission": pa.array([0, 1, 1, 0], pa.int64()),
            "Age": pa.array([40.0, 50.0, 60.0, 70.0]),
            "DID": pa.array(["a", "b", "a", "b"]),
            "w": pa.array([1.0, 2.0, 1.0, 1.0]),
            "label": pa.array(["x", "y", "x", "y"]),
            "score": pa.array([0.1, 0.2, 0.3, 0.4]),
            "year": pa.array([2019, 2020, 2021, 2022], pa.int32()),
            "day": pa.array([dt.date(2021, 1, i) for i in (1, 2, 3, 4)]),
            "when": pa.array([dt.datetime(2021, 1, 1)] * 4, pa.timestamp("us")),
        })
        pq.write_table(table, root / f"region={region}" / "part-0.parquet")
    return root


def spec_for(root, **kw):
    raw = {"name": "n", "dataset": str(root), "formula": "remission ~ Age + (1 | DID)",
           "family": "binomial", "strata": ["region"]}
    raw.update(kw)
    return load_spec(raw)


def test_validate_non_formula_checks(hospital):
    formula = pytest.importorskip("fitting.formula")
    assert hasattr(formula, "formula_variables")
    report = validate_spec(spec_for(hospital, weights="w", filters=[["year", ">=", 2020]]))
    assert report.n_files == 2
    assert report.strata_columns == ("region",)
    assert set(report.used_columns) == {"remission", "Age", "DID", "w", "region"}
    assert "region" in report.schema.names


@pytest.mark.parametrize(
    "kw, field, fragment",
    [
        ({"strata": ["regoin"]}, "strata", "unknown column 'regoin' in dataset {root} (did you mean 'region'?)"),
        ({"strata": ["score"]}, "strata", "column 'score' has type double, which cannot define strata"),
        ({"strata": ["when"]}, "strata", "cannot define strata"),
        ({"weights": "wt"}, "weights", "unknown column 'wt'"),
        ({"weights": "label"}, "weights", "column 'label' has type string; expected a numeric column"),
        ({"offset": "label"}, "offset", "expected a numeric column"),
        ({"filters": [["yaer", ">=", 2020]]}, "filters[0]", "unknown column 'yaer' in dataset {root} (did you mean 'year'?)"),
        ({"filters": [["year", ">=", "2020x"]]}, "filters[0]", "cannot compare column 'year'"),
        ({"filters": [["label", "==", 3]]}, "filters[0]", "not comparable with column 'label'"),
        ({"filters": [["year", ">", 1], ["day", "<", "notadate"]]}, "filters[1]", "cannot compare column 'day'"),
        ({"filters": [["year", "in", [2020, "x"]]]}, "filters[0]", "'x'"),
    ],
)
def test_validate_errors_name_field_and_culprit(hospital, kw, field, fragment):
    pytest.importorskip("fitting.formula")
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, **kw))
    assert info.value.field == field
    assert fragment.format(root=hospital) in info.value.message


def test_validate_filters_that_work(hospital):
    pytest.importorskip("fitting.formula")
    spec = spec_for(hospital, filters=[["day", "<", dt.date(2021, 1, 3)], ["year", "in", [2020, 2021]],
                                       ["label", "!=", "y"], ["region", "==", "north"]])
    validate_spec(spec)


def test_validate_formula_columns_and_parse_errors(hospital):
    pytest.importorskip("fitting.formula")
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, formula="remission ~ Agee + (1 | DID)"))
    assert info.value.field == "formula" and "'Agee'" in info.value.message
    assert "(did you mean 'Age'?)" in info.value.message
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, formula="remission ~ Age + (1 | DOC)"))
    assert info.value.field == "formula" and "'DOC'" in info.value.message
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, formula="remission ~ Age + (1 | "))
    assert info.value.field == "formula"
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, formula="label ~ Age + (1 | DID)", family="gaussian"))
    assert info.value.field == "formula" and "numeric" in info.value.message


def test_validate_dataset_errors(tmp_path, hospital):
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(tmp_path / "missing"))
    assert info.value.field == "dataset" and "not found" in info.value.message
    (hospital / "region=north" / "zz.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital))
    assert info.value.field == "dataset" and "zz.parquet" in info.value.message


def test_validate_agq_needs_one_grouping_factor(hospital):
    pytest.importorskip("fitting.formula")
    validate_spec(spec_for(hospital, method="agq", nagq=9))
    # vector random effects on one grouping factor are integrated by a tensor-product grid
    validate_spec(spec_for(hospital, method="agq", nagq=9, formula="remission ~ Age + (Age | DID)"))
    validate_spec(spec_for(hospital, method="agq", nagq=1,
                           formula="remission ~ Age + (1 | DID) + (1 | label)"))
    with pytest.raises(SpecError) as info:
        validate_spec(spec_for(hospital, method="agq", nagq=9,
                               formula="remission ~ Age + (1 | DID) + (1 | label)"))
    assert info.value.field == "nagq" and "single grouping factor" in info.value.message
    assert "DID" in info.value.message and "label" in info.value.message


def test_used_columns_schema_order(hospital):
    pytest.importorskip("fitting.formula")
    from service.dataset import open_dataset
    from service.spec import used_columns

    spec = spec_for(hospital, formula="remission ~ log(Age) + offset(score) + (1 | DID)", weights="w")
    schema = open_dataset(hospital).schema
    assert used_columns(spec, schema) == ("remission", "Age", "DID", "w", "score", "region")

"""SQLAlchemy 2 models: the job queue, the strata ledger and the fitted results.

Tables
------
``jobs``
    The durable queue; ``attempt`` is the fencing token incremented by every claim.
``strata``
    One row per (job, stratum key): the ledger of what is done (``status``) and how often
    it was tried (``attempts``).
``fits``
    One row per fitted stratum (unique per stratum), with diagnostics and the optimiser
    record stored verbatim (``optinfo``, ``warnings``).
``coefficients``, ``variance_components``, ``random_effects``
    Children of ``fits``.

Conventions: explicit table names, a constraint naming convention (so Alembic and the
models agree on names), every foreign key indexed (alone or as the leading column of a
unique index), relationships ``lazy="raise"`` (the store uses Core statements and never
lazy-loads), timestamps timezone-aware UTC (:class:`UTCDateTime`), and float columns that
store NaN/inf as NULL (:class:`FiniteFloat`).
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.states import JobStatus, StratumStatus

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "metadata",
    "UTCDateTime",
    "FiniteFloat",
    "Job",
    "Stratum",
    "Fit",
    "Coefficient",
    "VarianceComponent",
    "RandomEffect",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Surrogate keys: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A ``TIMESTAMP WITH TIME ZONE`` that always round-trips aware UTC datetimes.

    Naive datetimes are taken to be UTC. SQLite has no time zone type, so values are
    stored there as naive UTC text (fixed width, so comparisons in SQL stay correct).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class FiniteFloat(sa.TypeDecorator[float]):
    """A double precision column storing NaN and ±inf as NULL.

    Numpy scalars are converted to Python floats on the way in.
    """

    impl = sa.Double()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None


def _in_check(column: str, enum: type) -> str:
    names = ", ".join(f"'{m.value}'" for m in enum)
    return f"{column} IN ({names})"


class Base(DeclarativeBase):
    """Declarative base with the naming convention and the shared type map."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        float: FiniteFloat(),
        dict[str, Any]: sa.JSON(),
        list[Any]: sa.JSON(),
    }


metadata = Base.metadata


class Job(Base):
    """A job in the queue (see :mod:`storage.states` for the lifecycle)."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.CheckConstraint(_in_check("status", JobStatus), name="status"),
        sa.Index("ix_jobs_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.Text)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(sa.String(128))
    status: Mapped[str] = mapped_column(sa.String(32), default=JobStatus.QUEUED.value)
    attempt: Mapped[int] = mapped_column(default=0)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    n_strata: Mapped[int | None]
    message: Mapped[str | None] = mapped_column(sa.Text)

    strata: Mapped[list[Stratum]] = relationship(back_populates="job", lazy="raise")


class Stratum(Base):
    """The ledger row of one stratum of a job."""

    __tablename__ = "strata"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "key"),
        sa.CheckConstraint(_in_check("status", StratumStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    # Indexed by uq_strata_job_id_key (job_id is its leading column).
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(sa.Text)
    values: Mapped[dict[str, Any]]
    nrows: Mapped[int | None]
    status: Mapped[str] = mapped_column(sa.String(32), default=StratumStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(default=0)
    error_class: Mapped[str | None] = mapped_column(sa.String(255))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="strata", lazy="raise")
    fit: Mapped[Fit | None] = relationship(back_populates="stratum", lazy="raise")


class Fit(Base):
    """One fitted model (at most one per stratum)."""

    __tablename__ = "fits"
    __table_args__ = (sa.UniqueConstraint("job_id", "stratum_id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    # Indexed by uq_fits_job_id_stratum_id (leading column).
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    stratum_id: Mapped[int] = mapped_column(
        sa.ForeignKey("strata.id", ondelete="CASCADE"), unique=True
    )
    nobs: Mapped[int | None]
    ngroups: Mapped[dict[str, Any] | None]
    loglik: Mapped[float | None]
    aic: Mapped[float | None]
    bic: Mapped[float | None]
    deviance: Mapped[float | None]
    converged: Mapped[bool | None]
    singular: Mapped[bool | None]
    max_grad: Mapped[float | None]
    evaluations: Mapped[int | None]
    elapsed: Mapped[float | None]
    warnings: Mapped[list[Any] | None]
    optinfo: Mapped[dict[str, Any] | None]
    formula: Mapped[str | None] = mapped_column(sa.Text)
    family: Mapped[str | None] = mapped_column(sa.String(64))
    link: Mapped[str | None] = mapped_column(sa.String(64))
    method: Mapped[str | None] = mapped_column(sa.String(64))
    reml: Mapped[bool | None]
    sigma: Mapped[float | None]
    hessian_pd: Mapped[bool | None]
    attempt: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    stratum: Mapped[Stratum] = relationship(back_populates="fit", lazy="raise")
    coefficients: Mapped[list[Coefficient]] = relationship(lazy="raise")
    variance_components: Mapped[list[VarianceComponent]] = relationship(lazy="raise")
    random_effects: Mapped[list[RandomEffect]] = relationship(lazy="raise")


class Coefficient(Base):
    """One fixed-effect row (Wald table) of a fit."""

    __tablename__ = "coefficients"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    fit_id: Mapped[int] = mapped_column(
        sa.ForeignKey("fits.id", ondelete="CASCADE"), index=True
    )
    term: Mapped[str] = mapped_column(sa.Text)
    estimate: Mapped[float | None]
    std_error: Mapped[float | None]
    statistic: Mapped[float | None]
    p_value: Mapped[float | None]
    conf_low: Mapped[float | None]
    conf_high: Mapped[float | None]


class VarianceComponent(Base):
    """One variance (``term2`` NULL) or covariance row of a fit."""

    __tablename__ = "variance_components"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    fit_id: Mapped[int] = mapped_column(
        sa.ForeignKey("fits.id", ondelete="CASCADE"), index=True
    )
    grp: Mapped[str] = mapped_column(sa.Text)
    term1: Mapped[str | None] = mapped_column(sa.Text)
    term2: Mapped[str | None] = mapped_column(sa.Text)
    variance: Mapped[float | None]
    sd: Mapped[float | None]
    correlation: Mapped[float | None]


class RandomEffect(Base):
    """One conditional mode (with its conditional sd) of a fit."""

    __tablename__ = "random_effects"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    fit_id: Mapped[int] = mapped_column(
        sa.ForeignKey("fits.id", ondelete="CASCADE"), index=True
    )
    grp: Mapped[str] = mapped_column(sa.Text)
    level: Mapped[str] = mapped_column(sa.Text)
    term: Mapped[str] = mapped_column(sa.Text)
    mode: Mapped[float | None]
    cond_sd: Mapped[float | None]

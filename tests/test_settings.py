"""Settings that are easy to get wrong: where jobs are stored and how durations are written."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubesentiment.settings import Settings


def test_the_jobs_database_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBS_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert Settings().jobs_db == tmp_path / "data" / "kubesentiment" / "jobs.db"
    monkeypatch.setenv("JOBS_DB", "relative.db")  # an explicit relative path is made absolute
    assert Settings().jobs_db == tmp_path / "relative.db"


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("86400", timedelta(days=1)),
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("PT24H", timedelta(hours=24)),
    ],
)
def test_job_retention_reads_seconds_units_and_iso_8601(
    written: str, meant: timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_RETENTION", written)
    assert Settings().job_retention == meant


@pytest.mark.parametrize("written", ["0", "soon", "-5m"])
def test_a_retention_that_is_not_a_positive_duration_is_refused(
    written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_RETENTION", written)
    with pytest.raises(ValidationError, match="job_retention"):
        Settings()


def test_the_default_retention_is_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOB_RETENTION", raising=False)
    assert Settings().job_retention == timedelta(hours=24)


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Helm value left as "" must not become the path '.' (a CA file that is a directory)."""
    monkeypatch.setenv("KAFKA_SSL_CAFILE", "")
    monkeypatch.setenv("VAULT_ADDR", "")
    settings = Settings()
    assert settings.kafka_ssl_cafile is None and settings.vault_addr is None


@pytest.mark.parametrize("tracing", [False, True])
def test_tracing_off_keeps_every_request_out_of_bentomls_tracing_middleware(
    tracing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.util.http import ExcludeList

    from kubesentiment import observability

    monkeypatch.setattr(observability, "get_settings", lambda: Settings(tracing=tracing))
    options = observability.per_request_options()
    excluded = ExcludeList(options.get("tracing", {}).get("excluded_urls", []))
    for url in ("http://127.0.0.1:3000/api/v1/predict", "http://h/api/v1/batch/status/1"):
        assert excluded.url_disabled(url) is not tracing
    assert options["logging"]["access"]["enabled"] is False  # ACCESS_LOG's default

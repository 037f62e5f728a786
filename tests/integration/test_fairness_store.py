"""The scheduled refresh on real Postgres: cohort in the bookkeeping tables -> views -> analysis -> result tables.

Results computed from the database must equal those computed from the same cohort's CSV; the reporting views must
give the same turnarounds; the gauges must show the headline figures.
"""
from __future__ import annotations

import csv
import secrets
from dataclasses import replace
from datetime import UTC, datetime

import pydicom
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, insert, select, text

from pacs_bridge.study_attributes import DEFAULT_POSTCODE_TABLE, AttributePolicy, PostcodeTable
from sql.database import make_engine, upgrade
from sql.fairness_schema import fairness_refreshes
from sql.report_schema import study_attributes
from sql.schema import instances, series, studies
from tests.support.databases import POSTGRES_ADMIN_URL
from tests.support.dicom_factory import write_mr_series
from train.fairness.analysis import analyse
from train.fairness.analysis import select as select_rows
from train.fairness.cohort import load_cohort_csv, write_cohort_db
from train.fairness.make_cohort import DEFAULT_OUT
from train.fairness.metrics import publish
from train.fairness.store import load_latest, refresh
from worker.commands.train_settings import fairness_config
from worker.config import load_settings

#: The analysis's parameters as the default configuration gives them.
DEFAULT_FAIRNESS = fairness_config(load_settings(environ={}).fairness)


@pytest.fixture(scope="module")
def loaded():
    """One database with the synthetic cohort for the tests that only add refreshes (loading takes seconds)."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"triage_fairness_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    engine = make_engine(url)
    write_cohort_db(engine, DEFAULT_OUT)
    yield engine
    engine.dispose()
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.mark.slow  # loads the 6000-study cohort into Postgres once per module
def test_refresh_from_postgres_matches_the_analysis_of_the_csv(loaded):
    config = DEFAULT_FAIRNESS
    from_csv = analyse(load_cohort_csv(DEFAULT_OUT), config)

    stored = refresh(loaded, config)

    with loaded.connect() as connection:
        latest = load_latest(connection)
        view_rows = connection.execute(text(
            "SELECT group_value, odds_ratio, p_adjusted FROM v_fairness_latest_turnaround_odds "
            "WHERE attribute = 'region' AND threshold_days = 7 AND significant")).all()
    assert latest.refresh_id == stored.refresh_id and latest.n_studies == 6000 and latest.n_reported == 6000
    assert [(o.attribute, o.group_value, o.threshold_days) for o in latest.odds] == \
        [(o.attribute, o.group_value, o.threshold_days) for o in from_csv.odds]
    for mine, theirs in zip(latest.odds, from_csv.odds):
        assert (mine.n_group, mine.n_group_long, mine.n_reference_long) == \
            (theirs.n_group, theirs.n_group_long, theirs.n_reference_long)
        assert mine.odds_ratio == pytest.approx(theirs.odds_ratio) and mine.significant == theirs.significant
    old_db, = select_rows(latest.disparities, metric="tpr", diagnosis="all", attribute="age_band", group_value="80+")
    old_csv, = select_rows(from_csv.disparities, metric="tpr", diagnosis="all", attribute="age_band",
                           group_value="80+")
    assert old_db.bootstrap_group == pytest.approx(old_csv.bootstrap_group) and old_db.flagged
    assert [row.group_value for row in view_rows] == ["north"]
    assert view_rows[0].odds_ratio == pytest.approx(
        select_rows(from_csv.odds, attribute="region", group_value="north", threshold_days=7.0)[0].odds_ratio)


@pytest.mark.slow  # loads the 6000-study cohort into Postgres once per module
def test_turnaround_view_gives_the_three_turnarounds_in_seconds(loaded):
    with DEFAULT_OUT.open(newline="") as handle:
        first = next(csv.DictReader(handle))
    stamp = {k: datetime.fromisoformat(first[k]) for k in ("exam_at", "last_image_at", "queued_at", "started_at",
                                                          "delivered_at", "reported_at")}
    with loaded.connect() as connection:
        row = connection.execute(text("SELECT * FROM v_study_turnaround WHERE study_instance_uid = :uid"),
                                 {"uid": first["study_instance_uid"]}).mappings().one()
        outcomes = connection.execute(text("SELECT diagnosis, predicted, truth FROM v_diagnosis_outcomes "
                                           "WHERE study_instance_uid = :uid"), {"uid": first["study_instance_uid"]})
        outcomes = {d: (p, t) for d, p, t in outcomes}
    assert row["ai_turnaround_s"] == pytest.approx((stamp["delivered_at"] - stamp["last_image_at"]).total_seconds())
    assert row["queue_wait_s"] == pytest.approx((stamp["started_at"] - stamp["queued_at"]).total_seconds())
    assert row["radiologist_turnaround_s"] == pytest.approx(
        (stamp["reported_at"] - stamp["exam_at"]).total_seconds())
    assert row["region"] == first["region"] and row["age_band"] == first["age_band"]
    truth = first["truth"]
    assert {d: t for d, (_, t) in outcomes.items()} == {d: int(d == truth) for d in outcomes}
    assert {d: p for d, (p, _) in outcomes.items()} == {
        d: int(float(first[f"p_{d}"]) >= 0.5) for d in outcomes}


@pytest.mark.slow  # loads the 6000-study cohort into Postgres once per module
def test_gauges_show_the_headline_figures(loaded):
    results = refresh(loaded, replace(DEFAULT_FAIRNESS, intersections=()))
    publish(results, 1234.0)
    north = select_rows(results.odds, attribute="region", group_value="north", threshold_days=7.0)[0]
    value = REGISTRY.get_sample_value("triage_fairness_long_turnaround_odds_ratio", {
        "threshold_days": "7", "attribute": "region", "group": "north", "reference": north.reference_value})
    assert value == pytest.approx(north.odds_ratio)
    assert REGISTRY.get_sample_value("triage_fairness_rate_disparity",
                                     {"metric": "tpr", "attribute": "age_band", "group": "80+"}) < -0.1
    assert REGISTRY.get_sample_value("triage_fairness_findings", {"kind": "tpr"}) >= 1
    assert REGISTRY.get_sample_value("triage_fairness_findings", {"kind": "fpr"}) == 0
    assert REGISTRY.get_sample_value("triage_turnaround_median_seconds", {"measure": "radiologist"}) > 3600
    assert REGISTRY.get_sample_value("triage_fairness_last_refresh_timestamp_seconds") == 1234.0


@pytest.mark.slow  # loads the 6000-study cohort into Postgres once per module
def test_a_failed_refresh_is_recorded_and_the_last_good_one_stays_current(loaded):
    good = refresh(loaded, replace(DEFAULT_FAIRNESS, intersections=()))
    with pytest.raises(ValueError, match="unknown multiple-testing correction 'bonferoni'"):
        refresh(loaded, replace(DEFAULT_FAIRNESS, intersections=(), correction="bonferoni"))
    with loaded.connect() as connection:
        statuses = connection.execute(select(fairness_refreshes.c.status, fairness_refreshes.c.error)
                                      .order_by(fairness_refreshes.c.id)).all()
        assert load_latest(connection).refresh_id == good.refresh_id
    assert [s for s, _ in statuses[-2:]] == ["done", "failed"] and "bonferoni" in statuses[-1].error


def test_refresh_reads_attributes_of_received_studies_from_their_dicom_headers(engine, tmp_path):
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    path = write_mr_series(tmp_path / "store", n=1, study_uid=study_uid)[0]
    dataset = pydicom.dcmread(path)
    dataset.Manufacturer, dataset.ManufacturerModelName, dataset.StudyTime = "Contoso Medical", "CM Vega 3T", "101500"
    dataset.StudyDate = "20260103"  # a Saturday
    dataset.save_as(path)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        study_id = connection.execute(insert(studies).values(
            study_instance_uid=study_uid, status="done", version=1, instance_count=1, first_received_at=now,
            last_received_at=now)).inserted_primary_key[0]
        series_id = connection.execute(insert(series).values(
            study_id=study_id, series_instance_uid=dataset.SeriesInstanceUID, instance_count=1)).inserted_primary_key[0]
        connection.execute(insert(instances).values(
            series_id=series_id, sop_instance_uid=dataset.SOPInstanceUID, sop_class_uid=dataset.SOPClassUID,
            path=str(path), size_bytes=path.stat().st_size, sha256="0" * 64, received_at=now))
        # The report came first: HL7 already said the patient is a woman from the north, aged 65-79.
        connection.execute(insert(study_attributes).values(
            study_instance_uid=study_uid, sex="F", age_band="65-79", region="north", density_quartile="Q2",
            sources={"sex": "hl7", "age_band": "hl7", "region": "hl7", "density_quartile": "hl7"}, updated_at=now))
    policy = AttributePolicy(postcodes=PostcodeTable.load(DEFAULT_POSTCODE_TABLE))

    refresh(engine, DEFAULT_FAIRNESS, policy)
    refresh(engine, DEFAULT_FAIRNESS, policy)  # the header is read once, not on every refresh

    with engine.connect() as connection:
        row = connection.execute(select(study_attributes)).one()
    assert (row.sex, row.age_band, row.region, row.scheduling) == ("F", "65-79", "north", "weekend")
    assert (row.scanner_manufacturer, row.scanner_model) == ("Contoso Medical", "CM Vega 3T")
    assert row.exam_at == datetime(2026, 1, 3, 10, 15, tzinfo=UTC)
    assert row.sources == {"sex": "hl7", "age_band": "hl7", "region": "hl7", "density_quartile": "hl7",
                           "scheduling": "dicom", "scanner_manufacturer": "dicom", "scanner_model": "dicom",
                           "dicom_header": "read"}

"""The synthetic cohort with planted effects: ``python -m train.fairness.make_cohort [OUT] [--seed N] [--studies N]``.

Writes OUT (default ``var/fairness/synthetic_cohort.csv``; the shipped copy is ``train/data/synthetic_cohort.csv``,
``DEFAULT_OUT``) in the layout ``train.fairness.cohort`` reads. Every attribute is drawn
independently of every other, so an effect planted on one group does not leak into the groups of another
attribute (intersections that contain the planted group carry it, as they should). Planted:

- **Turnaround:** studies from region ``north`` have three times the odds of waiting more than 7 days for their
  final report (baseline probability 0.08, odds 0.087; north odds 0.261, probability 0.207). Everything else about
  turnaround is the same for everyone, so a 3-day threshold shows a smaller effect for north only.
- **Model sensitivity:** for patients aged 80 and over, the model finds a present diagnosis with probability 0.65
  instead of 0.85 (TPR 0.2 lower). The false-positive rate is 0.05 for everyone (no FPR effect).

Nothing else is planted: any other "finding" is noise, and the report must not flag it.
"""
from __future__ import annotations

import argparse
import csv
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

from pacs_bridge.study_attributes import DEFAULT_POSTCODE_TABLE, AttributePolicy, PostcodeTable
from sql.report_schema import UNKNOWN

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "synthetic_cohort.csv"
DIAGNOSES = ("structural_edema", "trauma_subdural_hematoma", "tumor_adult_brain_metastasis",
             "tumor_adult_meningioma", "vascular_ischemic_large_vessel_stroke")
PREVALENCE = 0.08  # per diagnosis; at most one diagnosis per patient
BASE_LONG7, PLANTED_ODDS_RATIO, PLANTED_REGION = 0.08, 3.0, "north"
BASE_TPR, PLANTED_TPR, PLANTED_AGE_BAND = 0.85, 0.65, "80+"
FPR = 0.05
THRESHOLD = 0.5
#: England and Wales bank holidays of 2025: the cohort's examinations fall in that year.
HOLIDAYS_2025 = ("2025-01-01", "2025-04-18", "2025-04-21", "2025-05-05", "2025-05-26", "2025-08-25",
                 "2025-12-25", "2025-12-26")
SCANNERS = (("Northwind Imaging", "NW Aurora 3T", 0.30), ("Northwind Imaging", "NW Lumen 1.5T", 0.20),
            ("Contoso Medical", "CM Vega 3T", 0.22), ("Contoso Medical", "CM Orion 1.5T", 0.18),
            ("Fabrikam", "FK Atlas 1.5T", 0.06), (UNKNOWN, UNKNOWN, 0.04))


def _choice(rng: np.random.Generator, values: dict[str, float], size: int) -> np.ndarray:
    names, weights = list(values), np.array(list(values.values()))
    return np.array(names, dtype=object)[rng.choice(len(names), size=size, p=weights / weights.sum())]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def make_cohort(studies: int = 6000, seed: int = 7) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    policy = AttributePolicy(holidays=frozenset(date.fromisoformat(d) for d in HOLIDAYS_2025), timezone="UTC",
                             postcodes=PostcodeTable.load(DEFAULT_POSTCODE_TABLE))
    prefixes = sorted(policy.postcodes.entries)
    sex = _choice(rng, {"F": 0.48, "M": 0.475, "O": 0.005, UNKNOWN: 0.04}, studies)
    age_band = _choice(rng, {"0-17": 0.06, "18-39": 0.20, "40-64": 0.35, "65-79": 0.25, "80+": 0.10,
                             UNKNOWN: 0.04}, studies)
    ethnic = _choice(rng, {"white": 0.60, "asian": 0.12, "black": 0.10, "mixed": 0.05, "other": 0.05,
                           UNKNOWN: 0.08}, studies)
    insurance = _choice(rng, {"public": 0.70, "private": 0.20, "self-pay": 0.05, UNKNOWN: 0.05}, studies)
    scanner = rng.choice(len(SCANNERS), size=studies, p=np.array([s[2] for s in SCANNERS]) / sum(s[2] for s in SCANNERS))
    postcode_known = rng.random(studies) >= 0.03
    postcodes = np.array(prefixes, dtype=object)[rng.integers(0, len(prefixes), size=studies)]
    start = datetime(2025, 1, 1, tzinfo=UTC)
    exam_at = [start + timedelta(days=int(day), hours=float(hour))
               for day, hour in zip(rng.integers(0, 365, size=studies), rng.uniform(7, 21, size=studies))]
    diagnosis = rng.choice(len(DIAGNOSES) + 1, size=studies,
                           p=[PREVALENCE] * len(DIAGNOSES) + [1 - PREVALENCE * len(DIAGNOSES)])

    rows = []
    for i in range(studies):
        region, density = policy.postcodes.lookup(postcodes[i]) if postcode_known[i] else (UNKNOWN, UNKNOWN)
        # Radiologist turnaround: planted odds of a >7-day wait; below 7 days the same distribution for everyone.
        odds = BASE_LONG7 / (1 - BASE_LONG7) * (PLANTED_ODDS_RATIO if region == PLANTED_REGION else 1.0)
        if rng.random() < odds / (1 + odds):
            turnaround_days = 7.0 + rng.exponential(4.0)
        else:
            turnaround_days = 7.0
            while turnaround_days >= 7.0:
                turnaround_days = float(rng.lognormal(np.log(1.2), 0.9))
        last_image = exam_at[i] + timedelta(minutes=float(rng.uniform(20, 45)))
        queued = last_image + timedelta(seconds=float(rng.uniform(10, 60)))
        started = queued + timedelta(seconds=float(rng.lognormal(np.log(30), 0.8)))
        delivered = started + timedelta(seconds=float(rng.lognormal(np.log(180), 0.3)))
        reported = exam_at[i] + timedelta(days=turnaround_days)

        tpr = PLANTED_TPR if age_band[i] == PLANTED_AGE_BAND else BASE_TPR
        probabilities = {}
        for index, name in enumerate(DIAGNOSES):
            called = rng.random() < (tpr if diagnosis[i] == index else FPR)
            probabilities[name] = rng.uniform(THRESHOLD, 0.99) if called else rng.uniform(0.01, THRESHOLD)
        manufacturer, model, _ = SCANNERS[scanner[i]]
        rows.append({
            "study_instance_uid": f"2.25.{seed}{i:07d}",
            "accession_number": f"SYN{seed}{i:07d}",
            "sex": sex[i], "age_band": age_band[i], "ethnic_group": ethnic[i], "region": region,
            "density_quartile": density, "scheduling": policy.scheduling(exam_at[i]),
            "scanner_manufacturer": manufacturer, "scanner_model": model, "insurance_class": insurance[i],
            "exam_at": _iso(exam_at[i]), "last_image_at": _iso(last_image), "queued_at": _iso(queued),
            "started_at": _iso(started), "delivered_at": _iso(delivered), "reported_at": _iso(reported),
            "truth": DIAGNOSES[diagnosis[i]] if diagnosis[i] < len(DIAGNOSES) else "",
            **{f"p_{name}": f"{p:.4f}" for name, p in probabilities.items()},
            "threshold": f"{THRESHOLD}",
        })
    return rows


def write_cohort(rows: list[dict[str, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None, prog: str = "python -m train.fairness.make_cohort",
         default_out: Path = Path("var/fairness/synthetic_cohort.csv")) -> int:
    # The default is under the working directory, never the shipped DEFAULT_OUT: an installed package's folder is
    # not the user's to write (and may be read-only). Regenerate the shipped file by naming it.
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=default_out,
                        help=f"CSV file to write (default: {default_out})")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--studies", type=int, default=6000)
    args = parser.parse_args(argv)
    write_cohort(make_cohort(args.studies, args.seed), args.out)
    print(f"wrote {args.studies} studies to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

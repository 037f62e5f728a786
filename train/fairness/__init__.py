"""Turnaround and algorithmic fairness across patient groups.

- ``cohort``: the studies to analyse (attributes, turnarounds, model calls, ground truth), from the database or a CSV.
- ``statistics``: odds ratios with Fisher's exact test, multiple-testing corrections, the bootstrap rate disparity.
- ``analysis``: every comparison the report makes, as plain result rows.
- ``store``: the scheduled refresh that writes the results to the database, and reading them back.
- ``metrics``: Prometheus gauges for the headline figures.
- ``report``: the HTML report with its plots.
- ``make_cohort``: the seeded synthetic cohort with planted effects (``train/data/synthetic_cohort.csv``).
"""

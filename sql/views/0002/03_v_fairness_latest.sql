-- The results of the latest completed fairness refresh, for dashboards and ad-hoc queries.
CREATE VIEW v_fairness_latest_turnaround_odds AS
SELECT o.*
FROM fairness_turnaround_odds o
WHERE o.refresh_id = (SELECT MAX(f.id) FROM fairness_refreshes f WHERE f.status = 'done');

CREATE VIEW v_fairness_latest_rate_disparities AS
SELECT d.*
FROM fairness_rate_disparities d
WHERE d.refresh_id = (SELECT MAX(f.id) FROM fairness_refreshes f WHERE f.status = 'done');

CREATE VIEW v_fairness_latest_turnaround_summary AS
SELECT s.*
FROM fairness_turnaround_summary s
WHERE s.refresh_id = (SELECT MAX(f.id) FROM fairness_refreshes f WHERE f.status = 'done');

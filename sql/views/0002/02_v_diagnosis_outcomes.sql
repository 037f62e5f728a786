-- One row per study with a final report and per diagnosis the model scored on its latest run: the model's call
-- (probability at or above the threshold stored with the prediction, 0.5 where none was stored) against the
-- ground truth from the latest final report. A diagnosis the report does not mention counts as absent (0);
-- uncertain mentions are -1 and left out of TPR/FPR by the analysis. Where several labellers labelled the report,
-- a manual label wins over an automatic one, and a later label over an earlier one.
CREATE VIEW v_diagnosis_outcomes AS
SELECT
    t.study_instance_uid,
    t.run_id,
    t.label_report_id,
    p.label AS diagnosis,
    p.probability,
    COALESCE(p.threshold, 0.5) AS threshold,
    CASE WHEN p.probability >= COALESCE(p.threshold, 0.5) THEN 1 ELSE 0 END AS predicted,
    COALESCE((SELECT g.value FROM ground_truth_labels g
               WHERE g.report_id = t.label_report_id AND g.label = p.label
               ORDER BY CASE WHEN g.source LIKE 'manual%' THEN 0 ELSE 1 END, g.created_at DESC, g.id DESC
               LIMIT 1), 0) AS truth
FROM v_study_turnaround t
JOIN predictions p ON p.run_id = t.run_id AND p.kind = 'diagnosis'
WHERE t.label_report_id IS NOT NULL;

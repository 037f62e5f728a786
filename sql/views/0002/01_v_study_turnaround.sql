-- One row per study: its sensitive attributes, the timestamps of its latest processing run and of its final
-- report, and the three turnarounds in seconds:
--   ai_turnaround_s           last image received -> SR acknowledged by the destination (processing_runs.delivered_at)
--   queue_wait_s              queued -> a worker started it
--   radiologist_turnaround_s  examination -> first final (F) or corrected (C) report
-- The examination time is the report's (HL7 OBR-7), else the study's (DICOM StudyDate/StudyTime), else the time its
-- first image arrived. label_report_id is the latest final report, whose labels are the study's ground truth.
-- SECONDS_BETWEEN(a, b) is replaced per database by the migration that creates this view.
CREATE VIEW v_study_turnaround AS
SELECT
    s.id AS study_id,
    s.study_instance_uid,
    s.accession_number,
    run.id AS run_id,
    run.status AS run_status,
    run.last_image_at,
    run.queued_at,
    run.started_at,
    run.delivered_at,
    COALESCE(first_report.exam_at, a.exam_at, s.first_received_at) AS exam_at,
    first_report.id AS first_report_id,
    first_report.reported_at,
    (SELECT r.id FROM reports r
      WHERE r.study_instance_uid = s.study_instance_uid AND r.status IN ('F', 'C')
      ORDER BY r.reported_at DESC, r.id DESC LIMIT 1) AS label_report_id,
    SECONDS_BETWEEN(run.last_image_at, run.delivered_at) AS ai_turnaround_s,
    SECONDS_BETWEEN(run.queued_at, run.started_at) AS queue_wait_s,
    SECONDS_BETWEEN(COALESCE(first_report.exam_at, a.exam_at, s.first_received_at), first_report.reported_at)
        AS radiologist_turnaround_s,
    COALESCE(a.sex, 'unknown') AS sex,
    COALESCE(a.age_band, 'unknown') AS age_band,
    COALESCE(a.ethnic_group, 'unknown') AS ethnic_group,
    COALESCE(a.region, 'unknown') AS region,
    COALESCE(a.density_quartile, 'unknown') AS density_quartile,
    COALESCE(a.scheduling, 'unknown') AS scheduling,
    COALESCE(a.scanner_manufacturer, 'unknown') AS scanner_manufacturer,
    COALESCE(a.scanner_model, 'unknown') AS scanner_model,
    COALESCE(a.insurance_class, 'unknown') AS insurance_class
FROM studies s
LEFT JOIN processing_runs run
    ON run.study_id = s.id
   AND run.study_version = (SELECT MAX(r2.study_version) FROM processing_runs r2 WHERE r2.study_id = s.id)
LEFT JOIN study_attributes a ON a.study_instance_uid = s.study_instance_uid
LEFT JOIN reports first_report
    ON first_report.id = (SELECT r.id FROM reports r
                           WHERE r.study_instance_uid = s.study_instance_uid AND r.status IN ('F', 'C')
                           ORDER BY r.reported_at, r.id LIMIT 1);

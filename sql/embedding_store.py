"""Study embeddings in the database, the input of nightly head retraining.

An embedding is stored per (study, ``backbone_id``): the encoder weights it came from. The worker stores the
embedding of every study it processes (:class:`EmbeddingRecordingPredictor`, wrapped around its predictor); the
nightly job computes those that are missing from the images in the store. Vectors are float32 bytes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from sql.registry_schema import study_embeddings
from sql.schema import series, studies, utcnow

log = logging.getLogger(__name__)


def store_embedding(
    engine: Engine, study_uid: str, backbone_id: str, vector: np.ndarray, model_version: str, source: str
) -> None:
    """Insert or replace the embedding of ``study_uid`` under ``backbone_id``."""
    data = np.asarray(vector, dtype="<f4").ravel()
    values = {"model_version": model_version, "dim": int(data.size), "vector": data.tobytes(), "source": source,
              "created_at": utcnow()}
    key = and_(study_embeddings.c.study_instance_uid == study_uid, study_embeddings.c.backbone_id == backbone_id)
    with engine.begin() as connection:
        if connection.execute(select(study_embeddings.c.id).where(key)).first() is not None:
            connection.execute(update(study_embeddings).where(key).values(**values))
            return
    try:
        with engine.begin() as connection:
            connection.execute(insert(study_embeddings).values(
                study_instance_uid=study_uid, backbone_id=backbone_id, **values))
    except IntegrityError:  # stored meanwhile by another process: the same study under the same weights
        log.debug("embedding of %s under %s was stored concurrently", study_uid, backbone_id)


def load_embeddings(connection: Connection, backbone_id: str, study_uids: Iterable[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """{study uid: vector} of the stored embeddings under ``backbone_id`` (of ``study_uids`` when given)."""
    query = select(study_embeddings.c.study_instance_uid, study_embeddings.c.vector).where(
        study_embeddings.c.backbone_id == backbone_id)
    wanted = None if study_uids is None else set(study_uids)
    result = {}
    for uid, blob in connection.execute(query):
        if wanted is None or uid in wanted:
            result[uid] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return result


def study_of_series(connection: Connection, series_uids: Sequence[str]) -> str | None:
    """The Study Instance UID that the given series belong to (the first one found)."""
    if not series_uids:
        return None
    row = connection.execute(
        select(studies.c.study_instance_uid)
        .select_from(series.join(studies, studies.c.id == series.c.study_id))
        .where(series.c.series_instance_uid.in_(list(series_uids)))
    ).first()
    return None if row is None else row.study_instance_uid


class EmbeddingRecordingPredictor:
    """A :class:`models.inference.StudyPredictor` that also stores each study's embedding.

    Storing is best effort: a failure is logged and never costs the study its result.
    """

    def __init__(self, predictor, engine: Engine, backbone_id: str) -> None:
        self._predictor = predictor
        self._engine = engine
        self.backbone_id = backbone_id

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)

    def _record(self, predictions: Sequence) -> None:
        for prediction in predictions:
            try:
                with self._engine.connect() as connection:
                    uid = study_of_series(connection, prediction.series_used)
                if uid is not None:
                    store_embedding(self._engine, uid, self.backbone_id, prediction.embedding,
                                    prediction.model_version, "worker")
            except Exception:  # the embedding store must never fail a study
                log.exception("could not store the study embedding (series %s)", prediction.series_used[:1])

    def predict(self, volumes):
        prediction = self._predictor.predict(volumes)
        self._record([prediction])
        return prediction

    def predict_batch(self, studies_volumes):
        predictions = self._predictor.predict_batch(studies_volumes)
        self._record(predictions)
        return predictions

    def predict_files(self, paths_by_series: Mapping):
        prediction = self._predictor.predict_files(paths_by_series)
        self._record([prediction])
        return prediction

"""The vector index and kNN: exact search equals brute force, approximate search keeps recall, persistence,
deletion, rebuild; kNN votes and regression as specified, with scores that rank for ROC curves."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from models.knn import Neighbour, knn_classify, knn_regress, label_scores, roc_auc
from models.vector_index import IndexSettings, VectorIndex, brute_force_search, choose_kind


def clustered(n: int, dim: int, clusters: int = 100, spread: float = 0.6, seed: int = 0):
    """Unit vectors around random centres, as embeddings of similar images are; returns (vectors, cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.integers(0, clusters, n)
    x = centres[which] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which


def assert_same_neighbours(found, expected_ids, expected_sims, atol: float = 1e-5) -> None:
    """The same neighbours in the same order, except that neighbours whose similarities are equal to within
    float32 rounding may come in either order (faiss's BLAS and numpy round the dot products differently)."""
    for row, (got, want, sims) in enumerate(zip(found, expected_ids, expected_sims)):
        assert set(got) == set(want), f"query {row}: {sorted(set(got) ^ set(want))} differ"
        for rank in np.flatnonzero(got != want):
            moved_from = int(np.flatnonzero(want == got[rank])[0])
            assert abs(sims[rank] - sims[moved_from]) < atol, f"query {row}: rank {rank} is not a tie"


@pytest.fixture(scope="module")
def data():
    vectors, _ = clustered(6000, 64)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 1000  # ids are the database's, not positions
    queries, _ = clustered(300, 64, seed=1)
    return vectors, ids, queries


def test_exact_index_equals_brute_force_numpy(data):
    vectors, ids, queries = data
    index = VectorIndex.build(64, vectors, ids)
    assert index.kind == "flat" and len(index) == len(vectors)
    sims, found = index.search(queries, 10)
    expected_sims, expected_ids = brute_force_search(vectors, ids, queries, 10)
    assert_same_neighbours(found, expected_ids, expected_sims)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)


def test_batched_queries_use_blas_from_20_queries_on():
    assert faiss.cvar.distance_compute_blas_threshold == 20


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_at_10_is_at_least_0_95(data, kind):
    vectors, ids, queries = data
    index = VectorIndex.build(64, vectors, ids, IndexSettings(exact_max=1000, approximate=kind))
    assert index.kind == kind
    _, found = index.search(queries, 10)
    _, expected = brute_force_search(vectors, ids, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected)])
    assert recall >= 0.95, recall


def test_kind_follows_the_configured_size():
    settings = IndexSettings(exact_max=100, approximate="hnsw")
    assert choose_kind(100, settings) == "flat" and choose_kind(101, settings) == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_persist_reload_delete_a_study_and_rebuild(tmp_path, data, kind):
    vectors, ids, queries = data
    index = VectorIndex.build(64, vectors, ids, IndexSettings(exact_max=1000), kind=kind)
    path = tmp_path / "slices.faiss"
    index.save(path)
    reloaded = VectorIndex.load(path, dim=64)
    assert reloaded.kind == kind and len(reloaded) == len(vectors)
    np.testing.assert_array_equal(reloaded.search(queries, 10)[1], index.search(queries, 10)[1])

    # delete "a study": its ids never come back, in this process or after a reload
    gone = ids[:50]
    reloaded.remove(gone)
    assert len(reloaded) == len(vectors) - 50
    assert not np.isin(reloaded.search(vectors[:50], 20)[1], gone).any()
    reloaded.save(path)
    again = VectorIndex.load(path)
    assert not np.isin(again.search(vectors[:50], 20)[1], gone).any()

    # rebuild from what is left gives the exact answer over the survivors
    left_vectors, left_ids = again.vectors_and_ids()
    assert sorted(left_ids) == sorted(ids[50:])
    rebuilt = VectorIndex.build(64, left_vectors, left_ids, kind="flat")
    expected_sims, expected = brute_force_search(vectors[50:], ids[50:], queries, 10)
    assert_same_neighbours(rebuilt.search(queries, 10)[1], expected, expected_sims)


def test_adding_later_and_asking_for_more_than_there_is(tmp_path):
    vectors, _ = clustered(5, 16, clusters=2)
    index = VectorIndex.build(16, vectors[:3], [1, 2, 3])
    index.add(vectors[3:], [4, 5])
    sims, found = index.search(vectors[:1], 8)
    assert sorted(found[0][:5]) == [1, 2, 3, 4, 5] and (found[0][5:] == -1).all()
    assert np.isneginf(sims[0][5:]).all()
    with pytest.raises(ValueError, match="16-d"):
        index.search(np.zeros((1, 8), np.float32), 3)


def test_a_missing_or_foreign_index_file_says_what_to_do(tmp_path):
    from models.vector_index import IndexError_

    with pytest.raises(IndexError_, match="triage index rebuild"):
        VectorIndex.load(tmp_path / "none.faiss")
    VectorIndex.build(8, np.eye(8, dtype=np.float32), np.arange(8)).save(tmp_path / "i.faiss")
    with pytest.raises(IndexError_, match="holds 8-d vectors"):
        VectorIndex.load(tmp_path / "i.faiss", dim=16)


def test_torch_exact_search_path_agrees_with_faiss(data):
    vectors, ids, queries = data
    index = VectorIndex.build(64, vectors, ids, device="torch:cpu")  # the CUDA path with faiss-cpu, on the CPU
    assert index._torch is not None
    expected_sims, expected_ids = brute_force_search(vectors, ids, queries, 10)
    assert_same_neighbours(index.search(queries, 10)[1], expected_ids, expected_sims)


# -- kNN ------------------------------------------------------------------------------------------------------
def test_knn_votes_are_similarity_weighted_fractions():
    sims = np.array([[0.9, 0.5, 0.1, -0.3]])
    labels = np.array([[[1, 0], [0, 1], [1, 1], [1, 1]]])
    scores = knn_classify(sims, labels, k=4)
    # the negative similarity gets no vote: (0.9 + 0.1) / 1.5 and (0.5 + 0.1) / 1.5
    np.testing.assert_allclose(scores, [[1.0 / 1.5, 0.6 / 1.5]])
    np.testing.assert_allclose(knn_classify(sims, labels, k=2), [[0.9 / 1.4, 0.5 / 1.4]])


def test_knn_regression_is_the_weighted_mean_of_values_present():
    sims = np.array([[0.8, 0.2, 0.5]])
    values = np.array([[70.0, 30.0, np.nan]])
    np.testing.assert_allclose(knn_regress(sims, values, k=3), [(0.8 * 70 + 0.2 * 30) / 1.0])


def test_neighbours_without_ground_truth_do_not_vote():
    neighbours = [Neighbour("a", 0.9, None), Neighbour("b", 0.6, frozenset({"pneumonia"})),
                  Neighbour("c", 0.3, frozenset())]
    assert label_scores(neighbours, ["pneumonia", "effusion"]) == pytest.approx(
        {"pneumonia": 0.6 / 0.9, "effusion": 0.0})
    assert label_scores([Neighbour("a", 0.9, None)]) == {}


def test_knn_scores_rank_a_separable_label_for_roc():
    vectors, cluster = clustered(3000, 32, clusters=10, spread=0.9, seed=3)
    truth = cluster < 3  # a "finding" carried by three of ten clusters
    train, test = slice(0, 2500), slice(2500, None)
    index = VectorIndex.build(32, vectors[train], np.arange(2500))
    sims, found = index.search(vectors[test], 20)
    scores = knn_classify(sims, truth[train][found][..., None].astype(float))[:, 0]
    assert roc_auc(scores, truth[test]) > 0.95
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75

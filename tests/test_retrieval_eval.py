"""Ranking metrics (`encoder.ranking`): ranks of the true pair, recall/mAP, precision by
diagnosis, clinical metrics, recall against exact search; and the evaluation's RRF."""

import numpy as np
import pytest

from encoder.ranking import (
    clinical_metrics,
    lesion_jaccard,
    pair_metrics,
    pair_ranks,
    precision_by_diagnosis,
    ranks_from_order,
    recall_at_k,
)
from retrieval.evaluation.retrieval import fuse_orders


def test_pair_ranks_by_hand():
    sim = np.array(
        [
            [0.9, 0.1, 0.2],  # pair best → rank 1
            [0.5, 0.4, 0.6],  # two items above the pair → rank 3
            [0.3, 0.3, 0.3],  # ties count against the query → rank 3
        ]
    )
    assert pair_ranks(sim).tolist() == [1, 3, 3]
    m = pair_metrics(pair_ranks(sim))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@5"] == 1.0
    assert m["mAP"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert m["median_rank"] == 3


def test_ranks_from_order_agrees_with_pair_ranks():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 20))
    order = np.argsort(-sim, axis=1)
    assert ranks_from_order(order).tolist() == pair_ranks(sim).tolist()


def test_precision_by_diagnosis_excludes_the_query():
    # two tight clusters of two; with k=1 each query's neighbour is its cluster mate
    x = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], dtype=np.float32)
    labels = ["a", "a", "b", "c"]
    out = precision_by_diagnosis(x, labels, k=1)
    assert out["P@1"] == pytest.approx(0.5)
    assert out["by_diagnosis"] == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_fuse_orders_row_by_row():
    a = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    b = np.array([[1, 0, 2, 3], [3, 2, 1, 0]])
    fused = fuse_orders([a, b])
    # row 0: 0 and 1 tie (1/61 + 1/62 each); the first list's order breaks the tie
    assert fused.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0]]
    c = np.array([[3, 2, 1, 0]])
    assert fuse_orders([c, c, a[:1]])[0, 0] == 3  # two lists agree on 3 first


def test_precision_of_a_single_case_is_nan():
    out = precision_by_diagnosis(np.ones((1, 2), np.float32), ["a"])
    assert np.isnan(out["P@0"]) and np.isnan(out["by_diagnosis"]["a"])


def test_recall_at_k_is_pair_metrics_recall():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    ranks = pair_ranks(q @ g.T)
    expected = pair_metrics(ranks, ks=(1, 5))
    assert recall_at_k(q, g, ks=(1, 5)) == {
        1: pytest.approx(expected["R@1"]),
        5: pytest.approx(expected["R@5"]),
    }


def test_clinical_metrics_by_hand():
    # one query (diagnosis a, lesion 0, OD) against three archive cases
    sim = np.array([[0.9, 0.5, 0.1]])
    query = {
        "diagnosis": np.array(["a"], object),
        "lesions": np.array([[True, False]]),
        "eye": np.array(["OD"], object),
    }
    archive = {
        "diagnosis": np.array(["b", "a", "a"], object),
        "lesions": np.array([[True, False], [True, True], [False, False]]),
        "eye": np.array(["OD", "OS", "OD"], object),
    }
    m = clinical_metrics(sim, query, archive, k=2, hit_at=1)
    assert m["hit@1"] == 0.0 and m["P@2"] == 0.5
    assert m["mAP@R"] == pytest.approx(0.5 / 2)  # R = 2: of the top 2, a hit at rank 2
    assert m["lesion_jaccard@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["same_eye@2"] == 0.5 and m["by_diagnosis"] == {"a": 0.5}
    assert lesion_jaccard(np.zeros((1, 2), bool), np.zeros((1, 2), bool)).tolist() == [[1.0]]

"""Tests for decaf_ray.partition: agent data splits (IID, non-IID, Dirichlet, shards, few-shot)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from decaf_ray.partition import (
    PARTITIONS,
    classes_per_agent,
    dirichlet,
    few_shot,
    iid,
    label_histogram,
    partition,
    shards,
)

DIGITS = load_digits().target.astype(np.int64)  # (1797,), 10 classes of 174..183 examples


def shots_labels(shots: int = 40, n_cls: int = 10, seed: int = 0) -> np.ndarray:
    """(shots * n_cls,) labels with exactly ``shots`` of each class, in shuffled order."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_cls), shots))


# scheme name -> params that are valid for both test label vectors with 10 agents
SCHEMES = {
    "iid": {},
    "classes_per_agent": {"classes_per_agent": 2},
    "dirichlet": {"alpha": 0.5},
    "shards": {"shards_per_agent": 2},
}


def assert_valid_split(parts: list[np.ndarray], n: int, n_agents: int, covers_all: bool = True):
    assert len(parts) == n_agents
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert len(p) > 0, "every agent must get data"
        assert np.all(np.diff(p) > 0), "sorted ascending without duplicates"
        assert p.min() >= 0 and p.max() < n
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "parts must be disjoint"
    if covers_all:
        assert len(allidx) == n


# ---- properties shared by every scheme ---------------------------------------------------------


@pytest.mark.parametrize("labels", [DIGITS, shots_labels()], ids=["digits", "40shots"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_valid_and_deterministic(scheme, labels):
    a = partition(labels, 10, scheme, seed=3, **SCHEMES[scheme])
    assert_valid_split(a, len(labels), 10)
    b = partition(labels, 10, scheme, seed=3, **SCHEMES[scheme])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition(labels, 10, scheme, seed=4, **SCHEMES[scheme])
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_registry_names():
    assert set(PARTITIONS) == {"iid", "classes_per_agent", "dirichlet", "shards"}


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    n_agents=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_and_shards_property(counts, n_agents, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    if n_agents > len(labels):
        with pytest.raises(ValueError, match="empty"):
            iid(labels, n_agents, seed)
        return
    parts = iid(labels, n_agents, seed)
    assert_valid_split(parts, len(labels), n_agents)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    hist = label_histogram(labels, parts)
    assert (hist.max(axis=0) - hist.min(axis=0)).max() <= 1, "stratified per class"
    if 2 * n_agents <= len(labels):
        sp = shards(labels, n_agents, 2, seed=seed)
        assert_valid_split(sp, len(labels), n_agents)
        sizes = [len(p) for p in sp]
        assert max(sizes) - min(sizes) <= 1


# ---- iid ---------------------------------------------------------------------------------------


def test_iid_forty_shots_ten_agents_gets_four_per_class():
    labels = shots_labels(40, 10)
    parts = iid(labels, 10, seed=0)
    assert np.array_equal(label_histogram(labels, parts), np.full((10, 10), 4))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_iid_remainders_rotate():
    # 3 classes of 11 over 4 agents: 33 examples -> sizes 8 or 9, never 3 extras on one agent
    labels = np.repeat(np.arange(3), 11)
    sizes = sorted(len(p) for p in iid(labels, 4, seed=1))
    assert sizes == [8, 8, 8, 9]


def test_iid_too_many_agents():
    with pytest.raises(ValueError, match="n_agents=6 > 5"):
        iid(np.arange(5) % 2, 6, seed=0)


# ---- classes_per_agent -------------------------------------------------------------------------


def test_cpa_one_class_each_is_paper_non_iid():
    labels = shots_labels(40, 10)
    parts = classes_per_agent(labels, 10, 1, seed=0)
    for i, p in enumerate(parts):
        assert np.array_equal(p, np.flatnonzero(labels == i))


def test_cpa_more_agents_than_classes_share():
    parts = classes_per_agent(DIGITS, 20, 1, seed=0)
    assert_valid_split(parts, len(DIGITS), 20)
    hist = label_histogram(DIGITS, parts)
    assert np.all((hist > 0).sum(axis=1) == 1), "each agent holds one class"
    assert np.all((hist > 0).sum(axis=0) == 2), "each class split over two agents"
    for c in range(10):
        held = hist[:, c][hist[:, c] > 0]
        assert held.max() - held.min() <= 1


def test_cpa_k2_five_agents_covers_all():
    parts = classes_per_agent(DIGITS, 5, 2, seed=0)
    assert_valid_split(parts, len(DIGITS), 5)
    hist = label_histogram(DIGITS, parts)
    for i in range(5):
        assert set(np.flatnonzero(hist[i])) == {2 * i, 2 * i + 1}


def test_cpa_k2_ten_agents_two_classes_each():
    parts = classes_per_agent(DIGITS, 10, 2, seed=0)
    hist = label_histogram(DIGITS, parts)
    for i in range(10):
        assert set(np.flatnonzero(hist[i])) == {2 * i % 10, (2 * i + 1) % 10}
    assert np.all((hist > 0).sum(axis=0) == 2), "each class held by two agents"


def test_cpa_uncovered_classes_raise():
    with pytest.raises(ValueError, match=r"classes_per_agent >= 2"):
        classes_per_agent(DIGITS, 5, 1, seed=0)


def test_cpa_bad_k_and_empty_agent_raise():
    with pytest.raises(ValueError, match="classes_per_agent must be"):
        classes_per_agent(DIGITS, 10, 11, seed=0)
    # 1 example of class 0 shared by agents 0 and 2 -> one of them empty
    with pytest.raises(ValueError, match="no example"):
        classes_per_agent(np.array([0, 1, 1, 1]), 4, 1, seed=0)


# ---- dirichlet ---------------------------------------------------------------------------------


def mean_entropy(hist: np.ndarray) -> float:
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(ent.mean())


def test_dirichlet_small_alpha_is_more_skewed():
    skewed = label_histogram(DIGITS, dirichlet(DIGITS, 10, 0.1, seed=0))
    flat = label_histogram(DIGITS, dirichlet(DIGITS, 10, 100.0, seed=0))
    assert mean_entropy(skewed) < mean_entropy(flat) - 0.5
    assert mean_entropy(flat) > 0.9 * np.log(10)


def test_dirichlet_min_size_respected():
    parts = dirichlet(DIGITS, 10, 0.3, min_size=50, seed=1)
    assert_valid_split(parts, len(DIGITS), 10)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(DIGITS, 10, 0.5, min_size=200, seed=0)  # 10 * 200 > 1797
    with pytest.raises(ValueError, match="larger alpha or a smaller min_size"):
        dirichlet(DIGITS, 10, 0.01, min_size=170, seed=0)  # possible, but not at this alpha
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(DIGITS, 10, 0.0, seed=0)


# ---- shards ------------------------------------------------------------------------------------


def test_shards_few_classes_per_agent():
    # 20 shards of ~90 on label-sorted digits (>= 174 per class): a shard spans <= 2 classes
    parts = shards(DIGITS, 10, 2, seed=0)
    hist = label_histogram(DIGITS, parts)
    assert (hist > 0).sum(axis=1).max() <= 2 * 2
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_shards_are_contiguous_in_sorted_order():
    labels = shots_labels(40, 10)  # 400 examples, 20 shards of exactly 20
    parts = shards(labels, 10, 2, seed=5)
    for p in parts:
        assert len(p) == 40
        hist = np.bincount(labels[p], minlength=10)
        # a 20-example shard inside a 40-example class block holds one or two classes
        assert 1 <= (hist > 0).sum() <= 4


def test_shards_too_few_examples_raise():
    with pytest.raises(ValueError, match="shards"):
        shards(np.arange(15) % 3, 5, 4, seed=0)


# ---- few_shot ----------------------------------------------------------------------------------


def test_few_shot_exact_count_and_nested():
    idx = few_shot(DIGITS, 16, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.array_equal(np.bincount(DIGITS[idx]), np.full(10, 16))
    assert set(few_shot(DIGITS, 8, seed=0)) <= set(idx)
    assert not np.array_equal(idx, few_shot(DIGITS, 16, seed=1))
    assert np.array_equal(few_shot(DIGITS, None, seed=0), np.arange(len(DIGITS)))


def test_few_shot_too_many_raises_naming_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 5)
    with pytest.raises(ValueError, match="class 1 has only 3"):
        few_shot(labels, 4, seed=0)
    with pytest.raises(ValueError, match="shots"):
        few_shot(labels, 0, seed=0)


# ---- label_histogram / dispatch ----------------------------------------------------------------


def test_label_histogram_sums_to_part_sizes():
    parts = dirichlet(DIGITS, 7, 0.5, seed=2)
    hist = label_histogram(DIGITS, parts, num_classes=12)
    assert hist.shape == (7, 12)
    assert np.array_equal(hist.sum(axis=1), [len(p) for p in parts])
    assert np.array_equal(hist.sum(axis=0)[:10], np.bincount(DIGITS))


def test_partition_dispatch_errors():
    with pytest.raises(ValueError, match="unknown partition scheme 'foo'.*dirichlet"):
        partition(DIGITS, 10, "foo", seed=0)
    with pytest.raises(ValueError, match="unknown param 'beta'.*alpha"):
        partition(DIGITS, 10, "dirichlet", seed=0, alpha=1.0, beta=2)
    with pytest.raises(ValueError, match="needs param 'alpha'"):
        partition(DIGITS, 10, "dirichlet", seed=0)
    direct = dirichlet(DIGITS, 10, 1.0, seed=0)
    via = partition(DIGITS, 10, "dirichlet", 0, alpha=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(direct, via))

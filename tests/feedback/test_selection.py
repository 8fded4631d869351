"""Choosing pairs: random pairs are distinct and valid; disagreement prefers what the ensemble disputes."""

import itertools

import pytest
import torch

from scoreaction.feedback.selection import candidate_pairs, disagreement, select_pairs


def unordered(pairs):
    return [tuple(sorted(p)) for p in pairs]


def check_valid(pairs, n_items, n_pairs, cond=None):
    assert len(pairs) == n_pairs
    assert all(isinstance(i, int) and isinstance(j, int) and 0 <= i < n_items and 0 <= j < n_items and i != j
               for i, j in pairs)
    assert len(set(unordered(pairs))) == n_pairs  # no pair twice, in either orientation
    if cond is not None:
        assert all(int(cond[i]) == int(cond[j]) for i, j in pairs)


@pytest.mark.parametrize("n_pairs", [1, 30, 400, 1225])  # sparse (rejection) and dense (enumeration) requests
def test_random_pairs_are_distinct_and_valid(n_pairs):
    pairs = select_pairs(50, n_pairs, generator=torch.Generator().manual_seed(0))
    check_valid(pairs, 50, n_pairs)
    if n_pairs == 1225:
        assert set(unordered(pairs)) == set(itertools.combinations(range(50), 2))


def test_random_pairs_are_uniform_and_unbiased_in_orientation():
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(6, 6)
    lefts = 0
    for _ in range(400):
        for i, j in select_pairs(6, 3, generator=gen):
            counts[min(i, j), max(i, j)] += 1
            lefts += i < j
    per_pair = counts[torch.triu(torch.ones(6, 6), 1).bool()]  # 15 pairs, 1200 draws: 80 expected each
    assert float(per_pair.min()) > 80 - 4 * 9 and float(per_pair.max()) < 80 + 4 * 9
    assert abs(lefts / 1200 - 0.5) < 4 * 0.5 / 1200**0.5


def test_random_pairs_share_the_condition_and_respect_exclusions():
    cond = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    pairs = select_pairs(10, 10, cond=cond, generator=torch.Generator().manual_seed(0))  # all 3 + 1 + 6 pairs
    check_valid(pairs, 10, 10, cond)
    with pytest.raises(ValueError, match="only 10"):
        select_pairs(10, 11, cond=cond)
    pairs = select_pairs(10, 8, cond=cond, exclude=[(1, 0), (3, 4)], generator=torch.Generator().manual_seed(0))
    assert not {(0, 1), (3, 4)} & set(unordered(pairs))
    with pytest.raises(ValueError, match="strategy"):
        select_pairs(10, 1, strategy="best")
    with pytest.raises(ValueError, match="one label per item"):
        select_pairs(10, 1, cond=cond[:5])


class HandMadeEnsemble:
    """Members agree on items 0-3 (rewards 0, 1, 2, 3) and dispute items 4 and 5 (+-10)."""

    def __init__(self):
        agree = torch.tensor([0.0, 1.0, 2.0, 3.0])
        self.r = torch.stack([torch.cat([agree, torch.tensor([10.0, -10.0])]),
                              torch.cat([agree, torch.tensor([-10.0, 10.0])])])

    def member_rewards(self, x, cond=None):
        return self.r[:, x[:, 0].long()]


def test_disagreement_prefers_disputed_pairs():
    model, items = HandMadeEnsemble(), torch.arange(6.0)[:, None]
    pairs = candidate_pairs(6, None, None, None)
    score = disagreement(model, items, pairs)
    best = tuple(pairs[score.argmax()].tolist())
    assert best == (4, 5) and float(score.max()) == pytest.approx(0.25, abs=1e-6)
    assert float(score[(pairs < 4).all(1)].max()) == 0.0  # undisputed pairs score zero
    top = select_pairs(6, 1, strategy="disagreement", items=items, model=model)
    assert unordered(top) == [(4, 5)]
    # without a per-item cap: the 9 pairs touching item 4 or 5 come first, in score order
    nine = select_pairs(6, 9, strategy="disagreement", items=items, model=model, max_item_uses=9,
                        generator=torch.Generator().manual_seed(0))
    check_valid(nine, 6, 9)
    assert all(4 in p or 5 in p for p in nine)
    # with the default cap (ceil(2 * 3 / 6) = 1 use per item) a batch of 3 covers 6 distinct items
    three = select_pairs(6, 3, strategy="disagreement", items=items, model=model)
    check_valid(three, 6, 3)
    assert sorted(i for p in three for i in p) == list(range(6))
    assert (4, 5) in unordered(three)


def test_disagreement_within_conditions_and_exclusions():
    model, items = HandMadeEnsemble(), torch.arange(6.0)[:, None]
    cond = torch.tensor([0, 0, 0, 1, 1, 0])  # 4 and 5 in different classes: (4, 5) is not allowed
    pairs = select_pairs(6, 2, strategy="disagreement", items=items, model=model, cond=cond, max_item_uses=2)
    check_valid(pairs, 6, 2, cond)
    assert all(4 in p or 5 in p for p in pairs)
    pairs = select_pairs(6, 1, strategy="disagreement", items=items, model=model, exclude=[(5, 4)])
    assert (4, 5) not in unordered(pairs) and (4 in pairs[0] or 5 in pairs[0])
    with pytest.raises(ValueError, match="needs the candidate"):
        select_pairs(6, 1, strategy="disagreement", items=items)
    with pytest.raises(ValueError, match="only 15 candidate"):
        select_pairs(6, 16, strategy="disagreement", items=items, model=model)


def test_candidate_pairs_subsample_is_distinct():
    gen = torch.Generator().manual_seed(0)
    pairs = candidate_pairs(1000, None, 5000, gen)
    assert pairs.shape == (5000, 2)
    assert bool((pairs[:, 0] < pairs[:, 1]).all())
    assert len(torch.unique(pairs, dim=0)) == 5000

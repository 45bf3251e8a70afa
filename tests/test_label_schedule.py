"""The labelling schedule: every pair for K <= 4, a seeded, resumable Swiss schedule above."""

import itertools
import random

import pytest

from sipo_plugin.pairs.label.schedule import (SKIP, TIE, all_pairs, best_and_worst, pair_key,
                                              plan_prompt, scores, swiss_rounds, swiss_schedule)


def _ids(k):
    return [f"c{i:02d}" for i in range(k)]


def _label_all(ids, utility, seed, stop_after=None):
    """Label the schedule as a consistent labeller (higher utility wins); the decisions."""
    decisions = {}
    while True:
        pending, _, _ = plan_prompt(ids, decisions, seed)
        if not pending or len(decisions) == stop_after:
            return decisions
        a, b = pending[0]
        decisions[pair_key(a, b)] = a if utility[a] > utility[b] else b


@pytest.mark.parametrize("k", [2, 3, 4])
def test_small_prompts_get_every_pair_once(k):
    ids = _ids(k)
    pending, done, planned = plan_prompt(ids, {}, seed=0)
    assert sorted(pair_key(*p) for p in pending) == sorted(itertools.combinations(ids, 2))
    assert (done, planned) == (0, k * (k - 1) // 2)
    decisions = {pair_key(*pending[0]): TIE}
    pending2, done2, planned2 = plan_prompt(ids, decisions, seed=0)
    assert pending2 == pending[1:] and (done2, planned2) == (1, planned)


def test_rounds_and_hand_computed_scores():
    assert [swiss_rounds(k) for k in (1, 2, 5, 8, 9, 16)] == [0, 1, 3, 3, 4, 4]
    decisions = {("a", "b"): "a", ("a", "c"): "c", ("b", "c"): TIE, ("c", "d"): SKIP}
    assert scores(["a", "b", "c", "d"], decisions) == {"a": 0, "b": -1, "c": 1, "d": 0}
    assert best_and_worst(["a", "b"], {("a", "b"): TIE}, seed=0) is None
    assert best_and_worst(["a", "b", "c"], decisions, seed=0) == ("c", "b")


@pytest.mark.parametrize("k", [5, 6, 7, 8, 9, 12])
def test_swiss_finds_best_and_worst_with_few_clicks(k):
    """Consistent preferences: the best and the worst are found, every seed, with no rematch
    and fewer clicks than every pair (about floor(K/2) * ceil(log2 K))."""
    rng = random.Random(k)
    ids = _ids(k)
    for seed in range(8):
        utility = {i: rng.random() for i in ids}
        decisions = _label_all(ids, utility, seed)
        shown = [pair_key(*p) for r in swiss_schedule(ids, decisions, seed) for p in r]
        assert len(shown) == len(set(shown)) == len(decisions)
        assert best_and_worst(ids, decisions, seed) == (max(ids, key=utility.get),
                                                         min(ids, key=utility.get))
        assert len(decisions) <= (k // 2) * swiss_rounds(k) + 2 * swiss_rounds(k)
        if k >= 8:
            assert len(decisions) < k * (k - 1) // 4
        _, done, planned = plan_prompt(ids, decisions, seed)
        assert done == planned == len(decisions)


def test_schedule_is_seeded_and_resumes_from_the_labels():
    ids = _ids(10)
    first = {seed: plan_prompt(ids, {}, seed)[0] for seed in range(4)}
    assert plan_prompt(ids, {}, 2)[0] == first[2]  # same seed, same first round
    assert len({tuple(p) for p in first.values()}) > 1  # another seed, another first round
    utility = {i: n for n, i in enumerate(ids)}
    full = _label_all(ids, utility, seed=3)
    rounds = swiss_schedule(ids, full, seed=3)
    for stop in range(len(full)):  # a restart after any label replays a prefix of the rounds
        prefix = _label_all(ids, utility, seed=3, stop_after=stop)
        shuffled = dict(random.Random(stop).sample(list(prefix.items()), len(prefix)))
        known = swiss_schedule(ids, shuffled, seed=3)
        assert known == rounds[:len(known)]
        pending = plan_prompt(ids, shuffled, seed=3)[0]
        assert pending and pair_key(*pending[0]) not in prefix


def test_sides_are_seeded_not_by_candidate_order():
    lefts = {p[0] for seed in range(6) for p in all_pairs(_ids(4), seed)}
    assert len(lefts) == 4  # every candidate appears on the left for some seed and pair

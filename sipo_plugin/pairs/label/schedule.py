"""Which pairs of a prompt's candidates to show, as pure functions of the labels so far.

K <= 4 candidates: every pair (K(K-1)/2 of them). More: a Swiss-style tournament. Each of
`swiss_rounds(K)` = ceil(log2 K) rounds pairs candidates of similar running score

    score(c) = wins(c) - losses(c)        (a tie or a skip counts 0; a bye is not a game)

without rematches (the pairing with the least sum of squared score differences); then playoff
rounds while two unbeaten, or two winless, candidates have not met (byes of an odd K can leave
them). Under consistent preferences the one unbeaten candidate is the best and the one winless
candidate the worst, found with about floor(K/2) * ceil(log2 K) clicks (K = 8: 12, against 28
for every pair; benchmarks/label_server.py measures it). Round r+1 is computed only from the
decisions of rounds 1..r and the seed, so a restarted session, which replays the same labels,
continues the same schedule.

A `decisions` mapping is keyed by `pair_key(a, b)` (the two ids sorted) with the outcome as the
winner's id, `TIE` or `SKIP`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

TIE = "=tie"
SKIP = "=skip"
ALL_PAIRS_MAX_K = 4
_MATCH_STEPS = 20_000  # backtracking budget of one round's pairing; greedy beyond it


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The order-free key of a pair: its two ids sorted."""
    return (a, b) if a <= b else (b, a)


def swiss_rounds(k: int) -> int:
    """Swiss rounds for `k` candidates: ceil(log2 k)."""
    return math.ceil(math.log2(k)) if k > 1 else 0


def _seeded_order(ids: Sequence[str], seed: int, salt: str) -> list[str]:
    """`ids` in an order fixed by (seed, salt): sha256 of each id, stable across runs and hosts."""
    def rank(i: str) -> str:
        return hashlib.sha256(f"{seed}|{salt}|{i}".encode()).hexdigest()
    return sorted(ids, key=rank)


def scores(ids: Sequence[str], decisions: Mapping[tuple[str, str], str],
           pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, int]:
    """wins - losses of each id over `pairs` (default: every decided pair among `ids`)."""
    out = {i: 0 for i in ids}
    keys = decisions.keys() if pairs is None else [pair_key(*p) for p in pairs]
    for key in keys:
        winner = decisions.get(key)
        if winner is None or winner in (TIE, SKIP) or key[0] not in out or key[1] not in out:
            continue
        loser = key[1] if winner == key[0] else key[0]
        out[winner] += 1
        out[loser] -= 1
    return out


def _match(order: list[str], met: set[tuple[str, str]],
           score: Mapping[str, int]) -> list[tuple[str, str]] | None:
    """The rematch-free pairing of `order` (best first, even length) with the least
    sum of (score_a - score_b)^2: a depth-first search, nearest partners first, pruned by the best
    cost found, within a step budget (then the best found so far; None if none was found).
    """
    best: list = [None, math.inf]
    steps = 0

    def search(rest: list[str], chosen: list[tuple[str, str]], cost: int) -> None:
        nonlocal steps
        if cost >= best[1] or steps > _MATCH_STEPS:
            return
        if not rest:
            best[0], best[1] = list(chosen), cost
            return
        head = rest[0]
        partners = sorted(range(1, len(rest)), key=lambda j: abs(score[head] - score[rest[j]]))
        for j in partners:
            steps += 1
            if pair_key(head, rest[j]) in met:
                continue
            chosen.append((head, rest[j]))
            search(rest[1:j] + rest[j + 1:], chosen, cost + (score[head] - score[rest[j]]) ** 2)
            chosen.pop()

    search(order, [], 0)
    return best[0]


def _swiss_round(ids: Sequence[str], seed: int, number: int, played: list[tuple[str, str]],
                 decisions: Mapping[tuple[str, str], str],
                 byes: Mapping[str, int]) -> list[tuple[str, str]]:
    """Round `number` (0-based): sort by score (seeded tie-break), byes rotate, no rematch."""
    score = scores(ids, decisions, played)
    order = sorted(_seeded_order(ids, seed, f"round{number}"), key=lambda i: -score[i])
    if len(order) % 2:  # the bye: of those with the fewest byes, the one nearest the median
        fewest = min(byes[i] for i in order)
        middle = (len(order) - 1) / 2
        order.pop(min((j for j, i in enumerate(order) if byes[i] == fewest),
                      key=lambda j: abs(j - middle)))
    met = {pair_key(*p) for p in played}
    matched = _match(order, met, score)
    if matched is None:  # no rematch-free pairing (or budget spent): greedy, dropping rematches
        matched, free = [], list(order)
        while len(free) > 1:
            head = free.pop(0)
            partner = next((j for j in free if pair_key(head, j) not in met), None)
            if partner is not None:
                free.remove(partner)
                matched.append((head, partner))
    return [_orient(a, b, seed) for a, b in matched]


def _orient(a: str, b: str, seed: int) -> tuple[str, str]:
    """Which of a pair is shown on the left: seeded, so position carries no information."""
    first = _seeded_order([a, b], seed, "side")[0]
    return (a, b) if first == a else (b, a)


def all_pairs(ids: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """Every pair of `ids` in a seeded order, each oriented left/right by the seed."""
    pairs = [(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    keyed = {f"{a}|{b}": (a, b) for a, b in pairs}
    return [_orient(*keyed[k], seed) for k in _seeded_order(list(keyed), seed, "all")]


def _playoff_round(ids: Sequence[str], seed: int, played: list[tuple[str, str]],
                   decisions: Mapping[tuple[str, str], str]) -> list[tuple[str, str]]:
    """At most two pairs: the two best-ranked unbeaten ids that have not met, and the two
    worst-ranked winless ids that have not met (a bye can leave two unbeaten after the rounds).
    """
    score = scores(ids, decisions, played)
    beaten, won = set(), set()
    for key in map(lambda p: pair_key(*p), played):
        winner = decisions.get(key)
        if winner is not None and winner not in (TIE, SKIP):
            won.add(winner)
            beaten.add(key[1] if winner == key[0] else key[0])
    order = sorted(_seeded_order(ids, seed, "playoff"), key=lambda i: -score[i])
    met = {pair_key(*p) for p in played}
    out: list[tuple[str, str]] = []
    for group in ([i for i in order if i not in beaten],
                  [i for i in reversed(order) if i not in won]):
        taken = {i for p in out for i in p}
        group = [i for i in group if i not in taken]
        pair = next(((a, b) for n, a in enumerate(group) for b in group[n + 1:]
                     if pair_key(a, b) not in met), None)
        if pair is not None:
            out.append(_orient(*pair, seed))
    return out


def swiss_schedule(ids: Sequence[str], decisions: Mapping[tuple[str, str], str],
                   seed: int) -> list[list[tuple[str, str]]]:
    """The rounds known so far: round r+1 appears once every pair of rounds 1..r is decided.

    `swiss_rounds(K)` Swiss rounds, then up to as many playoff rounds, while two unbeaten (or two
    winless) candidates have not met.
    """
    total = swiss_rounds(len(ids))
    rounds: list[list[tuple[str, str]]] = []
    played: list[tuple[str, str]] = []
    byes = {i: 0 for i in ids}
    while len(rounds) < 2 * total:
        if len(rounds) < total:
            pairs = _swiss_round(ids, seed, len(rounds), played, decisions, byes)
        else:
            pairs = _playoff_round(ids, seed, played, decisions)
        if not pairs:
            break
        rounds.append(pairs)
        played.extend(pairs)
        for i in set(ids) - {i for p in pairs for i in p}:
            byes[i] += 1
        if any(pair_key(*p) not in decisions for p in pairs):
            break
    return rounds


def plan_prompt(ids: Sequence[str], decisions: Mapping[tuple[str, str], str],
                seed: int) -> tuple[list[tuple[str, str]], int, int]:
    """(pending pairs in showing order, done, planned) for one prompt's candidates `ids`.

    `planned` = pairs of the known rounds + floor(K/2) for each round still to come.
    """
    k = len(ids)
    if k <= ALL_PAIRS_MAX_K:
        known, future = all_pairs(ids, seed), 0
    else:
        rounds = swiss_schedule(ids, decisions, seed)
        known = [p for r in rounds for p in r]
        future = max(swiss_rounds(k) - len(rounds), 0) * (k // 2)  # playoffs appear when due
    pending = [p for p in known if pair_key(*p) not in decisions]
    return pending, len(known) - len(pending), len(known) + future


def best_and_worst(ids: Sequence[str], decisions: Mapping[tuple[str, str], str],
                   seed: int) -> tuple[str, str] | None:
    """(best, worst) by score, ties broken by Buchholz (sum of opponents' scores) then the seed.

    None when the best and the worst have the same score (nothing was decided between them).
    """
    score = scores(ids, decisions)
    buchholz = {i: 0 for i in ids}
    for key, outcome in decisions.items():
        if outcome != SKIP and key[0] in score and key[1] in score:
            buchholz[key[0]] += score[key[1]]
            buchholz[key[1]] += score[key[0]]
    order = sorted(_seeded_order(ids, seed, "rank"), key=lambda i: (-score[i], -buchholz[i]))
    best, worst = order[0], order[-1]
    return None if score[best] == score[worst] else (best, worst)

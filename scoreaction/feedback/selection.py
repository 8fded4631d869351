"""Which pairs to ask about, among a pool of n_items candidate samples.

  random        uniform distinct unordered pairs (i != j, no pair twice), in random order and
                orientation; with `cond`, both items of a pair share their condition.
  disagreement  the pairs on which a reward ensemble disagrees most about the winner: score
                Var_k[ p_k(i, j) ] with p_k = sigmoid(r_k(x_i, c) - r_k(x_j, c)) the k-th member's
                win probability, taken greedily from the highest, each item in at most
                `max_item_uses` chosen pairs (default ceil(2 n_pairs / n_items)) so one uncertain
                item does not fill the whole batch. Scored over all candidate pairs, or over
                `max_candidates` uniformly drawn ones when there are more.

`model` is anything with `member_rewards(x, cond) -> (K, B)` (a BTRewardModel).
"""

from __future__ import annotations

import math

import torch

from scoreaction.errors import ScoreactionError

STRATEGIES = ("random", "disagreement")


def check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ScoreactionError(f"{name} must be an integer >= {low}, found {value!r}")
    return value


def groups_of(n_items: int, cond) -> list[torch.Tensor]:
    """Indices of the items that may be paired together: all of them, or one group per condition."""
    if cond is None:
        return [torch.arange(n_items)]
    cond = torch.as_tensor(cond).reshape(-1)
    if cond.shape != (n_items,):
        raise ScoreactionError(f"cond must hold one label per item ({n_items}), found shape {tuple(cond.shape)}")
    return [(cond == c).nonzero().flatten() for c in cond.unique()]


def candidate_pairs(n_items: int, cond, max_candidates: int | None, generator) -> torch.Tensor:
    """All allowed unordered pairs (i < j), as (M, 2), or max_candidates of them drawn uniformly."""
    groups = [g for g in groups_of(n_items, cond) if len(g) > 1]
    sizes = [len(g) * (len(g) - 1) // 2 for g in groups]
    total = sum(sizes)
    if total == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    if max_candidates is None or total <= max_candidates:
        parts = [g[torch.triu_indices(len(g), len(g), 1).T] for g in groups]
        return torch.cat(parts)
    # a uniform sample of allowed pairs: pick a group in proportion to its pair count, then a pair in it
    m = max_candidates
    which = torch.multinomial(torch.tensor(sizes, dtype=torch.float64), 2 * m, replacement=True, generator=generator)
    out = []
    for gi, g in enumerate(groups):
        k = int((which == gi).sum())
        if k == 0:
            continue
        a = torch.randint(len(g), (k,), generator=generator)
        b = torch.randint(len(g) - 1, (k,), generator=generator)
        b = b + (b >= a).long()
        out.append(torch.stack([g[torch.minimum(a, b)], g[torch.maximum(a, b)]], 1))
    pairs = torch.unique(torch.cat(out), dim=0)
    return pairs[torch.randperm(len(pairs), generator=generator)[:m]]


def select_pairs(n_items: int, n_pairs: int, *, strategy: str = "random", items: torch.Tensor | None = None,
                 cond=None, model=None, generator: torch.Generator | None = None, exclude=None,
                 max_item_uses: int | None = None, max_candidates: int | None = 200_000) -> list[tuple[int, int]]:
    """n_pairs distinct pairs (i, j), i != j, of item indices in [0, n_items); see the module docstring.

    items: the samples (n_items, *shape), needed by "disagreement"; cond: (n_items,) labels or None;
    exclude: pairs not to ask again (either orientation). Asking for more pairs than there are
    allowed ones is a ValueError."""
    check_int(n_items, "n_items", 0)
    check_int(n_pairs, "n_pairs", 0)
    if strategy not in STRATEGIES:
        raise ScoreactionError(f"strategy must be one of {STRATEGIES}, found {strategy!r}")
    excluded = {(min(int(a), int(b)), max(int(a), int(b))) for a, b in (exclude or [])}
    if strategy == "random":
        return random_pairs(n_items, n_pairs, cond, excluded, generator)
    if model is None or items is None:
        raise ScoreactionError("strategy 'disagreement' needs the candidate `items` and an ensemble `model`")
    if len(items) != n_items:
        raise ScoreactionError(f"items must hold n_items={n_items} samples, found {len(items)}")
    if max_item_uses is None:
        max_item_uses = max(1, math.ceil(2 * n_pairs / max(n_items, 1)))
    check_int(max_item_uses, "max_item_uses", 1)
    pairs = candidate_pairs(n_items, cond, max_candidates, generator)
    if excluded and len(pairs):
        keep = torch.tensor([(int(a), int(b)) not in excluded for a, b in pairs.tolist()])
        pairs = pairs[keep]
    if n_pairs > len(pairs):
        raise ScoreactionError(f"asked for {n_pairs} pairs but only {len(pairs)} candidate pairs are allowed")
    score = disagreement(model, items, pairs, cond)
    order = torch.argsort(score, descending=True, stable=True)
    uses = [0] * n_items
    chosen = []
    for i, j in pairs[order].tolist():
        if uses[i] < max_item_uses and uses[j] < max_item_uses:
            chosen.append((i, j))
            uses[i] += 1
            uses[j] += 1
            if len(chosen) == n_pairs:
                break
    if len(chosen) < n_pairs:  # the per-item cap was too tight: fill with the best remaining pairs
        taken = set(chosen)
        chosen += [p for p in map(tuple, pairs[order].tolist()) if p not in taken][: n_pairs - len(chosen)]
    flip = torch.rand(len(chosen), generator=generator) < 0.5  # random orientation: no left/right bias
    return [(j, i) if f else (i, j) for (i, j), f in zip(chosen, flip.tolist())]


@torch.no_grad()
def disagreement(model, items: torch.Tensor, pairs: torch.Tensor, cond=None) -> torch.Tensor:
    """Var_k p_k(i, j) over the ensemble members for each pair (M, 2) -> (M,)."""
    c = None if cond is None else torch.as_tensor(cond).reshape(-1)
    r = torch.cat([model.member_rewards(items[s:s + 4096], None if c is None else c[s:s + 4096])
                   for s in range(0, len(items), 4096)], dim=1)  # (K, n_items)
    if r.ndim != 2 or r.shape[1] != len(items):
        raise ScoreactionError(f"model.member_rewards must return (K, {len(items)}), found {tuple(r.shape)}")
    p = torch.sigmoid(r[:, pairs[:, 0]] - r[:, pairs[:, 1]])
    return p.var(0, unbiased=False)


def random_pairs(n_items: int, n_pairs: int, cond, excluded: set, generator) -> list[tuple[int, int]]:
    groups = [g for g in groups_of(n_items, cond) if len(g) > 1]
    sizes = torch.tensor([len(g) * (len(g) - 1) // 2 for g in groups], dtype=torch.float64)
    labels = None if cond is None else torch.as_tensor(cond).reshape(-1).tolist()
    allowed_excluded = sum(1 for a, b in excluded
                           if 0 <= a < b < n_items and (labels is None or labels[a] == labels[b]))
    available = int(sizes.sum()) - allowed_excluded
    if n_pairs > available:
        raise ScoreactionError(f"asked for {n_pairs} distinct pairs but only {available} are allowed")
    if n_pairs == 0:
        return []
    if n_pairs > available // 4:  # dense request: enumerate and permute
        pairs = [p for p in map(tuple, candidate_pairs(n_items, cond, None, generator).tolist()) if p not in excluded]
        chosen = [pairs[k] for k in torch.randperm(len(pairs), generator=generator)[:n_pairs].tolist()]
    else:  # sparse request: rejection sampling (a uniform group by pair count, then a uniform pair in it)
        seen, chosen = set(excluded), []
        while len(chosen) < n_pairs:
            m = 2 * (n_pairs - len(chosen)) + 8
            which = torch.multinomial(sizes, m, replacement=True, generator=generator)
            draws = []
            for gi, g in enumerate(groups):
                k = int((which == gi).sum())
                if k:
                    a = torch.randint(len(g), (k,), generator=generator)
                    b = torch.randint(len(g), (k,), generator=generator)
                    draws.append(torch.stack([g[a], g[b]], 1))
            draws = torch.cat(draws)[torch.randperm(m, generator=generator)]
            for a, b in draws.tolist():
                p = (min(a, b), max(a, b))
                if a != b and p not in seen:
                    seen.add(p)
                    chosen.append(p)
                    if len(chosen) == n_pairs:
                        break
    flip = torch.rand(len(chosen), generator=generator) < 0.5  # random orientation: no left/right bias
    return [(j, i) if f else (i, j) for (i, j), f in zip(chosen, flip.tolist())]


__all__ = ["select_pairs", "disagreement", "candidate_pairs", "STRATEGIES"]

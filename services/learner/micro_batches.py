"""Micro-batches cut by a token budget instead of a row count, balanced over the ranks.

Long, uneven rollouts make equal row counts unequal work: one micro-batch holds an 8k-token
trace, another ten short answers. The rows are split over the ranks with near-equal token sums
(Karmarkar–Karp's largest differencing method, as veRL and OpenRLHF balance them), then each
rank's rows into as few micro-batches as keep each within the budget; every rank makes the same
number (under FSDP2 a forward pass is a collective).
"""

from __future__ import annotations

import heapq
import itertools
import math

import torch


def balanced_parts(sizes: list[int], k: int) -> list[list[int]]:
    """The indices of `sizes` in `k` parts of near-equal sums (none empty while there are at
    least `k` items), each part in ascending order."""
    order = itertools.count()
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for i, size in enumerate(sizes):  # each item alone: one part holds it, k - 1 are empty
        heapq.heappush(heap, (-size, next(order), [(size, [i])] + [(0, [])] * (k - 1)))
    while len(heap) > 1:  # merge the two partitions of largest spread, the big parts of one with the small of the other
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(x[0] + y[0], x[1] + y[1]) for x, y in zip(sorted(a, key=lambda p: p[0]),
                                                             sorted(b, key=lambda p: -p[0]), strict=True)]
        sums = [total for total, _ in merged]
        heapq.heappush(heap, (min(sums) - max(sums), next(order), merged))
    parts = [list(items) for _, items in heap[0][2]] if heap else [[] for _ in range(k)]
    for part in parts:  # a part left empty takes the smallest item of the part with the most
        if not part and len(sizes) >= k:
            donor = max(parts, key=len)
            part.append(donor.pop(min(range(len(donor)), key=lambda j: sizes[donor[j]])))
    return [sorted(part) for part in parts]


def by_tokens(tokens: torch.Tensor, budget: int, ranks: int) -> list[list[torch.Tensor]]:
    """Each rank's micro-batches (row indices into `tokens`, each row's token count): the rows
    over the ranks with near-equal token sums, then each rank's into the same number of
    micro-batches, the fewest that keep every one within `budget` tokens, or one row each on the
    rank with fewest rows (a row longer than the budget is a micro-batch alone)."""
    sizes = tokens.tolist()
    if len(sizes) < ranks:
        raise ValueError(f"{len(sizes)} rows cannot be shared by {ranks} ranks")
    groups = balanced_parts(sizes, ranks)
    fewest = min(len(group) for group in groups)
    count = min(fewest, max(math.ceil(sum(sizes[i] for i in group) / budget) for group in groups))
    while True:
        cut = [[[group[i] for i in part] for part in balanced_parts([sizes[i] for i in group], count)]
               for group in groups]
        if count == fewest or all(sum(sizes[i] for i in part) <= budget for parts in cut for part in parts):
            return [[torch.tensor(part, dtype=torch.long) for part in parts] for parts in cut]
        count += 1

"""One split's WordNet DAG (spec.raw["split_subgraphs"][SPLIT]) -> the leaf sets of its eligible nodes.

Used by the ImageNet branch of `episode_description.EpisodeDescriptionSampler` (MD §4.2 step 4).
"""

from __future__ import annotations

import numpy as np

# Largest number of leaves an internal node may span and still be picked (MD sampling.py). 392 is the
# smallest bound that keeps every ImageNet-v1 train leaf reachable.
MAX_SPANNING_LEAVES_ELIGIBLE = 392


def eligible_node_leaves(nodes: list, keep: np.ndarray, min_ways: int,
                         max_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE) -> list:
    """Split-relative leaf ids spanned by each eligible internal node, in MD's order.

    Rule (MD `EpisodeDescriptionSampler.__init__`): leaves (nodes without children) sorted by wn_id
    get split-relative ids 0..n-1. For every internal node, in increasing wn_id order, take the
    sorted ids of the leaves reachable through `children_ids` whose class passes the
    `min_examples_in_class` filter (`keep[id]`); the node is eligible iff
    `min_ways <= #ids <= max_leaves`.

    Args:
      nodes: the split's node list, each `{wn_id, children_ids, ...}`.
      keep: bool array, `keep[rel_id]` True if that leaf class passes the filter.
      min_ways: least number of leaves an eligible node must span.
      max_leaves: most number of leaves an eligible node may span.

    Returns:
      A list of int64 arrays (ascending ids), one per eligible node.
    """
    children = {n["wn_id"]: n["children_ids"] for n in nodes}
    leaves = sorted(wn for wn, kids in children.items() if not kids)
    # Python ints as bit sets: bit i set <=> the node spans leaf i. Sharing sub-DAGs is then an OR.
    spans = {wn: 1 << i for i, wn in enumerate(leaves)}

    def span(wn: str) -> int:
        if wn not in spans:
            mask = 0
            for kid in children[wn]:
                mask |= span(kid)
            spans[wn] = mask
        return spans[wn]

    keep_mask = int.from_bytes(np.packbits(np.asarray(keep, bool), bitorder="little").tobytes(),
                               "little")
    n_bytes = (len(leaves) + 7) // 8
    eligible = []
    for wn in sorted(children):
        if not children[wn]:
            continue
        mask = span(wn) & keep_mask
        bits = np.unpackbits(np.frombuffer(mask.to_bytes(n_bytes, "little"), np.uint8),
                             bitorder="little")
        ids = np.flatnonzero(bits).astype(np.int64)
        if min_ways <= len(ids) <= max_leaves:
            eligible.append(ids)
    return eligible

"""The tree layers end to end, without a model: beam trees -> SLO needs -> one budgeted selection.

    python examples/tree_layers.py

A stand-in draft (a fixed random table of next-token logits per depth) proposes candidate
trees for four requests with different latency targets. Their SLO clocks decide how many
tokens each must emit this step; ``select`` spends a shared budget on those needs first and
on the most likely remaining nodes after. The printed table shows what each request got.
"""

from __future__ import annotations

import torch

from adaspec.acceptance import Calibrator, grow_tree
from adaspec.select import select, tokens_needed
from adaspec.tree import ancestor_mask, expected_accepted, position_ids


def main() -> None:
    g = torch.Generator().manual_seed(0)
    R, V, depth, width, budget = 4, 1000, 6, 4, 40
    # A peaked stand-in draft: logits of the next token given (depth, last token).
    table = torch.randn(depth, V, V, generator=g) * 4.0
    roots = torch.randint(0, V, (R,), generator=g)

    # 1. Candidate trees: a beam of width 4, 6 levels deep (up to 25 nodes per request).
    cand, _ = grow_tree(roots, lambda gr: table[gr.depth][gr.frontier_tokens], depth, width)
    print(f"candidates: {cand}")

    # 2. SLO clocks: seconds per output token targets, decode time so far, tokens so far.
    slo = torch.tensor([0.020, 0.050, 0.050, 0.150])  # coding, chat, chat, summarisation
    elapsed = torch.tensor([1.00, 1.00, 1.00, 1.00])
    decoded = torch.tensor([46.0, 20.0, 19.0, 9.0])
    need = tokens_needed(slo, elapsed, decoded, step_latency=0.040, max_depth=depth)

    # 3. One budgeted selection over all requests.
    sel = select(cand, budget, need=need, max_per_request=16)

    print("\n| request | SLO ms/token | need | selected nodes | expected emitted | need met |")
    print("|---|---|---|---|---|---|")
    for r in range(R):
        print(
            f"| {r} | {1e3 * float(slo[r]):.0f} | {float(need[r]):.2f} | {int(sel.num_selected[r])} "
            f"| {float(sel.expected_accepted[r]):.2f} | {bool(sel.need_met[r])} |"
        )
    print(f"\nbudget {budget}: {int(sel.num_selected.sum())} nodes selected")

    # 4. What a target forward needs from the selected trees: masks and positions.
    mask = ancestor_mask(sel.tree)  # [R, M, M] node i sees j iff j is i or an ancestor
    pos = position_ids(sel.tree, cache_lens=torch.tensor([120, 64, 300, 18]))
    print(f"ancestor mask {tuple(mask.shape)}, positions of request 0: {pos[0].tolist()}")
    print(f"Σ f per request: {[round(v, 2) for v in expected_accepted(sel.tree).tolist()]}")

    # 5. After verification, the calibrator learns from what the target accepted.
    cal = Calibrator()
    cal.observe(sel.tree, accepted=torch.full((R, 1), -1))  # e.g. nothing accepted this step
    print(f"calibrator after one step: {cal.steps} step, {cal.observed_accepted:.0f} accepted")


if __name__ == "__main__":
    main()

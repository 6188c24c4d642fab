"""Oracles for the model adapter tests: plain causal forwards that the adapter did not produce."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from adaspec.tree import TokenTree, path_to


def plain_logits(model: nn.Module, tokens: list[int], last: int = 0) -> Tensor:
    """(L, V) float32 logits of a plain forward of one sequence, transformers' own masks.

    ``last`` > 0 keeps only the last ``last`` positions (L = last).
    """
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), logits_to_keep=last)
        logits: Tensor = out.logits[0].float()
    return logits


def plain_cache(model: nn.Module, tokens: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) (H, L, D) of a plain forward with a full (non-sliding) cache."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache_layers(cache)]


def cache_layers(state_or_cache: Any) -> list[Any]:
    """The layers of a DynamicCache or of a KVState's cache (typed loosely)."""
    cache = getattr(state_or_cache, "cache", state_or_cache)
    return list(cache.layers)


def path_tokens(tree: TokenTree, r: int, node: int) -> list[int]:
    """Tokens root -> node of row r."""
    one = tree[r]
    path = path_to(one, torch.tensor([node]))[0]
    return one.tokens[0, path[path >= 0]].tolist()


def random_tree(gen: torch.Generator, n: int, vocab: int) -> TokenTree:
    """A random tree of n nodes in topological order with decreasing logp."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tokens = torch.randint(0, vocab, (n,), generator=gen).tolist()
    logp = [0.0] * n
    for i in range(1, n):
        logp[i] = logp[parents[i]] - float(torch.rand(1, generator=gen)) - 0.01
    return TokenTree(tokens, parents, logp)


def random_path(gen: torch.Generator, tree: TokenTree) -> list[int]:
    """A random root-first path of row 0 (excluding the root), stopping at a random depth."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents[0, : int(tree.num_nodes[0])].tolist()):
        if p >= 0:
            children.setdefault(p, []).append(i)
    path, node = [], 0
    while node in children and float(torch.rand(1, generator=gen)) < 0.8:
        kids = children[node]
        node = kids[int(torch.randint(0, len(kids), (1,), generator=gen))]
        path.append(node)
    return path

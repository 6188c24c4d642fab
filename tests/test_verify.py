"""adaspec.verify: greedy oracle, determinism, batching, bad input, telemetry, KV compaction."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import Tensor

from adaspec.kernels import compact_kv
from adaspec.tree import TokenTree
from adaspec.verify import SpecStats, VerifyResult, sample_children, verify, verify_greedy


# ---------------------------------------------------------------------- random trees
def random_tree(
    g: torch.Generator,
    n: int,
    V: int,
    max_depth: int = 6,
    ties: bool = False,
    distinct: bool = False,
) -> tuple[list[int], list[int]]:
    """A random topologically ordered tree; small V makes repeated sibling tokens common
    (``distinct`` forbids them). Half of the tokens are the target's argmax after the
    parent, so paths get accepted."""
    parents, depth, tokens = [-1], [0], [int(torch.randint(V, (1,), generator=g))]
    paths: list[tuple[int, ...]] = [(tokens[0],)]
    for _ in range(1, n):
        choices = [i for i in range(len(parents)) if depth[i] < max_depth]
        p = choices[int(torch.randint(len(choices), (1,), generator=g))]
        if bool(torch.rand((), generator=g) < 0.5):
            tok = int(prefix_logits(paths[p], V, ties).argmax())
        else:
            tok = int(torch.randint(V, (1,), generator=g))
        siblings = {tokens[i] for i in range(1, len(parents)) if parents[i] == p}
        while distinct and tok in siblings:
            tok = int(torch.randint(V, (1,), generator=g))
        parents.append(p)
        depth.append(depth[p] + 1)
        tokens.append(tok)
        paths.append((*paths[p], tok))
    return parents, tokens


def paths_of(parents: list[int], tokens: list[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, p in enumerate(parents):
        out.append((tokens[0],) if p < 0 else (*out[p], tokens[i]))
    return out


def prefix_logits(path: tuple[int, ...], V: int, ties: bool) -> Tensor:
    """Logits as a fixed function of the whole path, like a real model; ``ties`` makes
    small integer logits so argmax ties (first index wins) occur."""
    seed = int.from_bytes(hashlib.sha256(repr(path).encode()).digest()[:6], "little")
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (V,), generator=g).float()
    # peaked so that random trees are often partly accepted
    x = torch.randn(V, generator=g)
    x[int(torch.randint(V, (1,), generator=g)) % 3] += 4.0
    return x


def batch(
    trees: list[tuple[list[int], list[int]]], V: int, ties: bool = False
) -> tuple[TokenTree, Tensor]:
    single = []
    rows = []
    for parents, tokens in trees:
        paths = paths_of(parents, tokens)
        logp = [-0.01 * (len(p) - 1) for p in paths]
        single.append(TokenTree(tokens, parents, logp))
        rows.append(torch.stack([prefix_logits(p, V, ties) for p in paths]))
    tree = TokenTree.stack(single)
    logits = torch.full((tree.num_requests, tree.max_nodes, V), float("nan"))  # padding: NaN
    for r, x in enumerate(rows):
        logits[r, : x.shape[0]] = x
    return tree, logits


def greedy_oracle(
    parents: list[int], tokens: list[int], V: int, ties: bool
) -> tuple[list[int], list[int]]:
    """Brute force: the deepest node (lowest index on ties) whose every token is the
    argmax after its parent's path; returns (accepted node indices, emitted tokens)."""
    paths = paths_of(parents, tokens)
    argmax = [int(prefix_logits(p, V, ties).argmax()) for p in paths]  # first index on ties
    ok = [True] + [False] * (len(parents) - 1)
    for i in range(1, len(parents)):
        ok[i] = ok[parents[i]] and tokens[i] == argmax[parents[i]]
    best = max((i for i in range(len(parents)) if ok[i]), key=lambda i: (len(paths[i]), -i))
    chain = []
    i = best
    while i > 0:
        chain.append(i)
        i = parents[i]
    chain.reverse()
    return chain, [tokens[i] for i in chain] + [argmax[best]]


def as_lists(res: VerifyResult, r: int) -> tuple[list[int], list[int]]:
    acc = [i for i in res.accepted[r].tolist() if i >= 0]
    return acc, [t for t in res.emitted[r].tolist() if t >= 0]


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("V", [4, 37])
def test_greedy_is_longest_argmax_path_on_random_trees(V: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(V + ties)
    trees = [
        random_tree(g, int(torch.randint(1, 24, (1,), generator=g)), V, ties=ties)
        for _ in range(99)
    ]
    tree, logits = batch(trees, V, ties)
    res = verify(tree, logits)
    assert res.accepted.shape == (99, int(tree.depth.max()))
    assert res.emitted.shape == (99, int(tree.depth.max()) + 1)
    for r, (parents, tokens) in enumerate(trees):
        acc, emitted = greedy_oracle(parents, tokens, V, ties)
        assert as_lists(res, r) == (acc, emitted)
        assert int(res.num_accepted[r]) == len(acc)
        assert int(res.bonus[r]) == emitted[-1]
        assert int(res.last_node[r]) == (acc[-1] if acc else 0)
    assert int(res.num_accepted.max()) >= 2  # the oracle comparison is not vacuous


@pytest.mark.parametrize("ties", [False, True])
def test_greedy_from_argmaxes_is_the_brute_force_path(ties: bool) -> None:
    g = torch.Generator().manual_seed(11 + ties)
    trees = [
        random_tree(g, int(torch.randint(1, 24, (1,), generator=g)), 37, ties=ties)
        for _ in range(99)
    ]
    tree, logits = batch(trees, 37, ties)
    chosen = logits.nan_to_num(0.0).argmax(-1).masked_fill(~tree.valid, -1)  # [R, N]
    res = verify_greedy(tree, chosen)
    for r, (parents, tokens) in enumerate(trees):
        assert as_lists(res, r) == greedy_oracle(parents, tokens, 37, ties)
    ref = verify(tree, logits)
    for name in ("accepted", "emitted", "bonus", "last_node", "num_draft_tokens"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), name
    assert int(res.num_accepted.max()) >= 2


def test_greedy_from_argmaxes_rejects_bad_input() -> None:
    tree = TokenTree([2, 1, 2, 0], [-1, 0, 0, 1], [0.0, -0.1, -0.2, -0.3])
    with pytest.raises(TypeError, match="target_argmax"):
        verify_greedy(tree, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"target_argmax must have shape \(R, N\) = \(1, 4\)"):
        verify_greedy(tree, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="tree"):
        verify_greedy([[2, 1]], torch.zeros(1, 4, dtype=torch.int64))  # type: ignore[arg-type]
    # a row with no choice is an error only where verification reads it
    with pytest.raises(ValueError, match="node 1 of request 0 has no choice"):
        verify_greedy(tree, torch.tensor([[1, -1, 5, 2]]))
    assert verify_greedy(tree, torch.tensor([[0, -1, -1, -1]])).emitted.tolist() == [[0, -1, -1]]


def test_greedy_accepts_low_precision_logits() -> None:
    g = torch.Generator().manual_seed(3)
    trees = [random_tree(g, 12, 5) for _ in range(20)]
    tree, logits = batch(trees, 5)
    ref = verify(tree, logits)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        again = verify(tree, low)
        # the argmax of the rounded logits decides; compare with the float32 verdict on them
        assert torch.equal(again.emitted, verify(tree, low.float()).emitted)
    assert ref.emitted.dtype == torch.int64


def test_per_request_zero_temperature_is_greedy() -> None:
    g = torch.Generator().manual_seed(4)
    # distinct siblings: a tree drawn without replacement has no repeated sibling tokens
    trees = [random_tree(g, 10, 12, distinct=True) for _ in range(30)]
    tree, logits = batch(trees, 12)
    temps = torch.tensor([0.0, 1.0, 0.5] * 10)
    mixed = verify(tree, logits, temperature=temps, generator=torch.Generator().manual_seed(0))
    greedy = verify(tree, logits)
    zero = temps == 0
    assert torch.equal(mixed.emitted[zero], greedy.emitted[zero])
    assert torch.equal(mixed.accepted[zero], greedy.accepted[zero])
    # the same holds for the draft rule: a one-hot target accepts exactly the argmax child
    draft = torch.softmax(torch.randn(logits.shape, generator=g), -1)
    with_draft = verify(tree, logits, temperature=temps, draft_probs=draft, generator=g)
    assert torch.equal(with_draft.emitted[zero], greedy.emitted[zero])


def test_single_node_trees_emit_only_the_bonus() -> None:
    tree = TokenTree(torch.tensor([[3], [1]]), torch.tensor([[-1], [-1]]), torch.zeros(2, 1))
    logits = torch.tensor([[[0.0, 5.0, 1.0, 2.0]], [[9.0, 0.0, 1.0, 2.0]]])
    res = verify(tree, logits)
    assert res.accepted.shape == (2, 0)
    assert res.emitted.tolist() == [[1], [0]]
    sampled = verify(tree, logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.num_accepted.tolist() == [0, 0]
    assert sampled.emitted.shape == (2, 1)


def test_padding_is_never_accepted() -> None:
    # row 1 is padded; padding tokens are 0, the argmax everywhere, and its logits are NaN
    t0 = TokenTree([1, 0, 0], [-1, 0, 1], [0.0, -0.1, -0.2])
    t1 = TokenTree([1], [-1], [0.0])
    tree = TokenTree.stack([t0, t1])
    logits = torch.full((2, 3, 3), -1.0)
    logits[..., 0] = 1.0
    logits[1, 1:] = float("nan")
    for kwargs in ({}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(0)}):
        res = verify(tree, logits, **kwargs)  # type: ignore[arg-type]
        assert int(res.num_accepted[1]) == 0
    res = verify(tree, logits)
    assert res.emitted.tolist() == [[0, 0, 0], [0, -1, -1]]
    draft = torch.full((2, 3, 3), 1 / 3)
    res = verify(
        tree, logits, temperature=1.0, draft_probs=draft, generator=torch.Generator().manual_seed(0)
    )
    assert int(res.num_accepted[1]) == 0


# ----------------------------------------------------------------- determinism, batch
@pytest.mark.parametrize("drafted", [False, True])
def test_seeded_generator_is_deterministic(drafted: bool) -> None:
    g = torch.Generator().manual_seed(5)
    trees = [random_tree(g, 15, 8) for _ in range(40)]
    tree, logits = batch(trees, 8)
    draft = torch.softmax(torch.randn(logits.shape, generator=g), -1) if drafted else None

    def run(seed: int) -> VerifyResult:
        return verify(
            tree,
            logits,
            temperature=1.0,
            top_p=0.9,
            draft_probs=draft,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    for field in ("accepted", "num_accepted", "bonus", "emitted", "last_node"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.emitted, c.emitted)


@pytest.mark.parametrize("drafted", [False, True])
def test_batch_equals_per_request_with_the_same_uniforms(drafted: bool) -> None:
    g = torch.Generator().manual_seed(6)
    trees = [random_tree(g, int(torch.randint(1, 14, (1,), generator=g)), 5) for _ in range(25)]
    tree, logits = batch(trees, 5)
    draft = torch.softmax(torch.randn(logits.shape, generator=g) * 2, -1) if drafted else None
    uniforms = torch.rand(tree.num_requests, tree.max_nodes, generator=g, dtype=torch.float64)
    res = verify(tree, logits, temperature=0.8, top_k=3, draft_probs=draft, uniforms=uniforms)
    for r in range(tree.num_requests):
        n = int(tree.num_nodes[r])
        one = verify(
            tree[r],
            logits[r : r + 1, :n],
            temperature=0.8,
            top_k=3,
            draft_probs=None if draft is None else draft[r : r + 1, :n],
            uniforms=uniforms[r : r + 1, :n],
        )
        assert as_lists(one, 0) == as_lists(res, r)
        assert int(one.bonus[0]) == int(res.bonus[r])
    greedy = verify(tree, logits)
    for r in range(tree.num_requests):
        n = int(tree.num_nodes[r])
        assert as_lists(verify(tree[r], logits[r : r + 1, :n]), 0) == as_lists(greedy, r)


# ---------------------------------------------------------------------- bad input
def small() -> tuple[TokenTree, Tensor]:
    tree = TokenTree.stack(
        [TokenTree([1, 2, 0], [-1, 0, 1], [0.0, -0.1, -0.2]), TokenTree([0], [-1], [0.0])]
    )
    return tree, torch.zeros(2, 3, 4)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (lambda x: x.__setitem__((0, 0, 1), float("nan")), {}, "target_logits"),
        (lambda x: x.__setitem__((0, 0), float("-inf")), {}, "target_logits"),
        (lambda x: x.__setitem__((0, 0, 2), float("inf")), {"temperature": 1.0}, "target_logits"),
        (lambda x: x.__setitem__((0, 0), float("nan")), {"temperature": 1.0}, "target_logits"),
        (None, {"temperature": -0.5}, "temperature"),
        (None, {"temperature": 1.0, "top_p": 0.0}, "top_p"),
        (None, {"temperature": 1.0, "top_p": 1.5}, "top_p"),
        (None, {"top_p": 1.5}, "top_p"),  # checked even when greedy
        (None, {"temperature": 1.0, "top_k": -1}, "top_k"),
        (None, {"temperature": torch.tensor([1.0, 2.0, 3.0])}, "temperature"),
        (
            None,
            {"temperature": 1.0, "uniforms": torch.full((2, 3), 1.0, dtype=torch.float64)},
            "uniforms",
        ),
        (None, {"temperature": 1.0, "uniforms": torch.zeros(2, 2)}, "uniforms"),
        (
            None,
            {"temperature": 1.0, "uniforms": torch.zeros(2, 3), "generator": torch.Generator()},
            "generator or uniforms",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(mutate, kwargs, match) -> None:
    tree, logits = small()
    if mutate is not None:
        mutate(logits)
    with pytest.raises(ValueError, match=match):
        verify(tree, logits, **kwargs)


def test_bad_shapes_and_vocab_raise() -> None:
    tree, logits = small()
    with pytest.raises(ValueError, match="target_logits must have shape"):
        verify(tree, logits[:, :2])
    with pytest.raises(ValueError, match="target_logits must have shape"):
        verify(tree, logits[:1])
    with pytest.raises(ValueError, match="target_logits must have shape"):
        verify(tree, logits[0])
    with pytest.raises(ValueError, match="vocabulary of target_logits"):
        verify(tree, logits[..., :2])  # token 2 needs V >= 3
    with pytest.raises(TypeError, match="target_logits"):
        verify(tree, logits.long())
    with pytest.raises(ValueError, match="draft_probs must have the shape"):
        verify(tree, logits, temperature=1.0, draft_probs=torch.ones(2, 3, 5))
    draft = torch.full((2, 3, 4), 0.25)
    draft[0, 0, 2] = 0.0  # node 1 (token 2) could not have been drawn under the root
    with pytest.raises(ValueError, match="draft_probs gives child token 2"):
        verify(tree, logits, temperature=1.0, draft_probs=draft)
    draft = torch.full((2, 3, 4), 0.25)
    draft[0, 1, 3] = -0.1
    with pytest.raises(ValueError, match="draft_probs must be finite and non-negative"):
        verify(
            tree,
            logits,
            temperature=1.0,
            draft_probs=draft,
            generator=torch.Generator().manual_seed(1),
        )


def test_draft_rows_of_leaves_are_not_read() -> None:
    tree, logits = small()
    draft = torch.full((2, 3, 4), 0.25)
    draft[0, 2] = float("nan")  # node 2 is a leaf
    draft[1] = float("nan")  # a single-node tree: its root has no children
    res = verify(
        tree, logits, temperature=1.0, draft_probs=draft, generator=torch.Generator().manual_seed(0)
    )
    assert res.emitted.shape == (2, 3)


def test_sample_children_edges() -> None:
    q = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    out = sample_children(q, 3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3)
    assert sorted(out[0, :2].tolist()) == [1, 2]
    assert int(out[0, 2]) == -1  # support exhausted
    assert len(set(out[1].tolist())) == 3
    assert sample_children(q, 0).shape == (2, 0)
    with pytest.raises(ValueError, match="num_children"):
        sample_children(q, 5)
    with pytest.raises(ValueError, match="draft_probs"):
        sample_children(-q, 1)


# ------------------------------------------------------------------------ telemetry
def test_stats_count_like_vllm_and_merge() -> None:
    # row 0: chain 1 -> 0 -> 2 all accepted; row 1: child rejected; row 2: single node
    tree = TokenTree.stack(
        [
            TokenTree([3, 1, 0, 2], [-1, 0, 1, 2], [0.0, -0.1, -0.2, -0.3]),
            TokenTree([3, 2, 1], [-1, 0, 0], [0.0, -0.1, -0.2]),
            TokenTree([3], [-1], [0.0]),
        ]
    )
    logits = torch.full((3, 4, 4), -3.0)
    logits[0, 0, 1] = logits[0, 1, 0] = logits[0, 2, 2] = logits[0, 3, 3] = 3.0
    logits[1:, :, 0] = 3.0
    res = verify(tree, logits)
    assert res.num_accepted.tolist() == [3, 0, 0]
    s = SpecStats.from_result(res, tree)
    d = s.as_dict()
    assert d["num_drafts"] == 3
    assert d["num_draft_tokens"] == 5
    assert d["num_accepted_tokens"] == 3
    assert d["num_emitted_tokens"] == 6
    assert d["num_accepted_tokens_per_depth"] == [1, 1, 1]
    assert d["num_draft_tokens_per_depth"] == [3, 1, 1]
    assert s.mean_accepted_length == 2.0
    assert s.acceptance_rate == pytest.approx(3 / 5)
    # merging with a shallower step pads the per-depth counters
    shallow = TokenTree([3, 1], [-1, 0], [0.0, -0.1])
    r2 = verify(shallow, torch.tensor([[[0.0, 9.0, 0, 0], [9.0, 0, 0, 0]]]))
    total = SpecStats.zeros() + s + SpecStats.from_result(r2, shallow)
    assert total.as_dict()["num_accepted_tokens_per_depth"] == [2, 1, 1]
    assert total.as_dict()["num_draft_tokens_per_depth"] == [4, 1, 1]
    assert total.mean_accepted_length == pytest.approx(8 / 4)
    assert s.update(r2, shallow).as_dict() == total.as_dict()
    assert math.isnan(SpecStats.zeros().mean_accepted_length)


def test_accepted_feeds_compact_kv() -> None:
    """The cache grows by exactly the emitted count, holding the accepted path in order."""
    g = torch.Generator().manual_seed(8)
    trees = [random_tree(g, int(torch.randint(1, 12, (1,), generator=g)), 4) for _ in range(16)]
    tree, logits = batch(trees, 4)
    res = verify(tree, logits, temperature=1.0, generator=g)
    R, N = tree.tokens.shape
    lens = torch.randint(0, 5, (R,), generator=g)
    S = 5 + N + 1
    k = torch.zeros(R, 1, S, 1)
    for r in range(R):
        k[r, 0, int(lens[r]) : int(lens[r]) + N, 0] = torch.arange(
            N
        ).float()  # slot holds its node id
    new = compact_kv(k, k.clone(), lens, res.accepted)
    assert torch.equal(new, lens + res.num_emitted)
    for r in range(R):
        acc, _ = as_lists(res, r)
        kept = k[r, 0, int(lens[r]) : int(new[r]), 0].long().tolist()
        assert kept == [0, *acc]


# ---------------------------------------------------------------------- examples run
# (docstring examples and docs/verify.md as a whole run in tests/test_docs.py)
def test_docs_page_examples_run() -> None:
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "verify.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    exec("\n".join(blocks), namespace)  # later blocks continue the first
    greedy = namespace["greedy"]
    assert isinstance(greedy, VerifyResult)
    assert greedy.accepted.tolist() == [[1, 3]]

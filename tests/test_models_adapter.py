"""The transformers adapter on tiny random models (no download): oracles are plain forwards."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspec.acceptance import TreeGrower, grow_tree
from adaspec.models import (
    KVState,
    commit,
    commit_draft,
    grow_draft_tree,
    map_accepted,
    prefill,
    share_prefix,
    shares_cache,
    tiny_model,
    tree_forward,
)
from adaspec.models.adapter import _new_cache, _shared_cache
from adaspec.models.vocab import SubsetHead
from adaspec.tree import SubTree, TokenTree, build_optimal, path_to
from tests.models_oracles import (
    cache_layers,
    path_tokens,
    plain_cache,
    plain_logits,
    random_path,
    random_tree,
)

VOCAB = 101
WINDOW = 4  # gemma3's sliding window in the tiny model: prefixes below cross it
ATOL = 1e-4  # float32 logits of size ~1-10; observed errors ~3e-6

MODELS = {
    (arch, impl): tiny_model(arch, sliding_window=WINDOW, attn_implementation=impl, seed=7)
    for arch in ("llama", "gemma3")
    for impl in ("sdpa", "eager")
}
KEYS = list(MODELS)
IDS = [f"{a}-{i}" for a, i in KEYS]


def prompts_of(gen: torch.Generator, lengths: list[int]) -> list[list[int]]:
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def pad_paths(paths: list[list[int]]) -> torch.Tensor:
    width = max(1, *(len(p) for p in paths))
    return torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.int64)


def test_cache_layers_append_into_spare_slots_and_read_as_concatenation() -> None:
    """Updates write into a buffer's spare slots (no copy of the cache per forward), crops
    and replaced tensors are honoured, and every read equals DynamicCache's concatenation."""
    gen = torch.Generator().manual_seed(0)
    cache = _new_cache()
    want = torch.zeros(2, 3, 0, 4)
    views = []
    for step, q in enumerate([5, 1, 1, 3, 70, 1, 2]):
        new = torch.randn(2, 3, q, 4, generator=gen)
        keys, values = cache.update(new, -new, 0)
        want = torch.cat([want, new], 2)
        assert torch.equal(keys, want)
        assert torch.equal(values, -want)
        views.append(keys)  # (kept: no buffer is freed and its address reused)
        layer = cache_layers(cache)[0]
        if step == 2:  # a crop (as after a rejected tree): the next update overwrites
            layer.keys, layer.values = layer.keys[:, :, :4], layer.values[:, :, :4]
            want = want[:, :, :4]
        if step == 5:  # a tensor that is not the buffer's view: copied into a new buffer
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    # 5 + 64 spare slots held the first 4 updates; 70 more needed a new buffer; the clone
    # a third one
    buffers = [v.data_ptr() for v in views]
    assert len(set(buffers[:4])) == 1
    assert len(set(buffers[4:6])) == 1
    assert len(set(buffers)) == 3


def test_a_shared_cache_never_writes_its_owner() -> None:
    gen = torch.Generator().manual_seed(1)

    def kv(q: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2, 1, q, 4, generator=gen), torch.randn(2, 1, q, 4, generator=gen)

    owner = _new_cache()
    owner.update(*kv(6), 0)
    before = cache_layers(owner)[0].keys.clone()
    ptr = cache_layers(owner)[0].keys.data_ptr()
    shared = _shared_cache(owner)
    keys, _ = shared.update(*kv(3), 0)
    shared.update(*kv(2), 0)
    assert torch.equal(cache_layers(owner)[0].keys, before)
    assert torch.equal(cache_layers(shared)[0].keys[:, :, :6], before)
    # the owner still appends into its own spare slots, which the shared cache never wrote
    grown = cache_layers(shared)[0].keys.clone()
    owner.update(*kv(1), 0)
    assert torch.equal(cache_layers(shared)[0].keys, grown)
    assert cache_layers(owner)[0].keys.data_ptr() == ptr != keys.data_ptr()


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_prefill_matches_plain_forward(key: tuple[str, str]) -> None:
    model = MODELS[key]
    prompts = prompts_of(torch.Generator().manual_seed(0), [1, 11, 5])
    state, logits = prefill(model, prompts)
    assert state.lens.tolist() == [1, 11, 5]
    assert state.pending == 0
    for r, p in enumerate(prompts):
        torch.testing.assert_close(logits[r], plain_logits(model, p)[-1], atol=ATOL, rtol=0)
    # the cache equals a plain forward's, slot for slot
    for r, p in enumerate(prompts):
        for layer, (k, v) in zip(cache_layers(state), plain_cache(model, p), strict=True):
            torch.testing.assert_close(layer.keys[r, :, : len(p)], k, atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.values[r, :, : len(p)], v, atol=1e-5, rtol=0)


def test_prefill_picks_last_positions_even_when_the_head_module_is_not_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = MODELS[KEYS[0]]
    prompts = prompts_of(torch.Generator().manual_seed(1), [4, 9, 2])
    _, picked = prefill(model, prompts)  # the hook on the output layer projects 3 rows
    # a model whose reported output module is not what its forward calls: the hook never
    # fires, and the last positions are picked from every position's logits instead
    monkeypatch.setattr(model, "get_output_embeddings", lambda: torch.nn.Identity())
    _, fallback = prefill(model, prompts)
    for r, p in enumerate(prompts):
        torch.testing.assert_close(picked[r], plain_logits(model, p)[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(fallback[r], picked[r], atol=ATOL, rtol=0)


def test_prefill_in_pieces_equals_prefill_at_once() -> None:
    model = MODELS[("gemma3", "sdpa")]
    prompts = prompts_of(torch.Generator().manual_seed(5), [7, 2, 10])
    state, _ = prefill(model, [p[:3] if len(p) > 3 else p[:1] for p in prompts])
    state, logits = prefill(model, [p[3:] if len(p) > 3 else p[1:] for p in prompts], state)
    whole, logits_whole = prefill(
        model, torch.tensor([p + [0] * (10 - len(p)) for p in prompts])[:, :2]
    )
    assert whole.lens.tolist() == [2, 2, 2]
    assert state.lens.tolist() == [7, 2, 10]
    for r, p in enumerate(prompts):
        torch.testing.assert_close(logits[r], plain_logits(model, p)[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            logits_whole[r], plain_logits(model, p[:2])[-1], atol=ATOL, rtol=0
        )


@settings(max_examples=12, deadline=None)
@given(
    key=st.sampled_from(KEYS),
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 7), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_tree_forward_matches_per_path_forward(
    key: tuple[str, str], lengths: list[int], sizes: list[int], seed: int
) -> None:
    """Every node's logits == a plain forward of prefix + root->node, in a mixed batch."""
    model = MODELS[key]
    gen = torch.Generator().manual_seed(seed)
    prompts = prompts_of(gen, lengths)
    R = len(prompts)
    if any(lengths):
        # prefill needs a token per request: an empty prompt becomes [0]
        prompts = [p or [0] for p in prompts]
        state, _ = prefill(model, prompts)
    else:  # nothing cached at all: the roots sit at position 0
        state = KVState.empty(R)
    tree = TokenTree.stack([random_tree(gen, n, VOCAB) for n in sizes[:R]])
    out = tree_forward(model, tree, state)
    assert out.shape == (R, tree.max_nodes, VOCAB)
    assert state.pending == tree.max_nodes
    for r in range(R):
        for i in range(int(tree.num_nodes[r])):
            ref = plain_logits(model, prompts[r] + path_tokens(tree, r, i))[-1]
            torch.testing.assert_close(out[r, i], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_commit_leaves_the_cache_of_a_plain_decode(key: tuple[str, str]) -> None:
    """Several steps of tree_forward + commit == plain decoding of the emitted tokens."""
    model = MODELS[key]
    gen = torch.Generator().manual_seed(1)
    seqs = prompts_of(gen, [2, 9, 5])
    state, _ = prefill(model, seqs)
    buffers: set[int] = set()
    for step in range(60):
        if step >= 4 and len(buffers) > 1:  # (until the cache outgrew its first buffer)
            break
        trees = [random_tree(gen, n, VOCAB) for n in (9, 1 + step % 4, 4)]
        tree = TokenTree.stack(trees)
        tree_forward(model, tree, state)
        buffers.add(cache_layers(state)[0].keys.data_ptr())
        paths = [random_path(gen, t) for t in trees]
        before = state.lens.clone()
        new = commit(state, pad_paths(paths))
        # DESIGN.md: the cache grows by the root plus the accepted nodes
        assert new.tolist() == [int(b) + 1 + len(p) for b, p in zip(before, paths, strict=True)]
        assert state.pending == 0
        assert state.capacity == int(new.max())
        for r, (t, p) in enumerate(zip(trees, paths, strict=True)):
            seqs[r] = seqs[r] + t.tokens[0, [0, *p]].tolist()
    for r, seq in enumerate(seqs):
        for layer, (k, v) in zip(cache_layers(state), plain_cache(model, seq), strict=True):
            torch.testing.assert_close(layer.keys[r, :, : len(seq)], k, atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.values[r, :, : len(seq)], v, atol=1e-5, rtol=0)
    assert len(buffers) > 1  # the layers moved to a larger buffer mid-run
    nxt = torch.tensor([[3], [4], [5]])
    out = tree_forward(model, TokenTree(nxt, torch.full((3, 1), -1), torch.zeros(3, 1)), state)
    for r, seq in enumerate(seqs):
        torch.testing.assert_close(
            out[r, 0], plain_logits(model, [*seq, int(nxt[r, 0])])[-1], atol=ATOL, rtol=0
        )


def test_a_state_made_in_inference_mode_grows_outside_it() -> None:
    """A cache buffer made under torch.inference_mode() cannot be written outside it: the
    layer copies into a new buffer instead (as concatenation did)."""
    model = MODELS[KEYS[0]]
    prompts = prompts_of(torch.Generator().manual_seed(3), [4, 7])
    with torch.inference_mode():
        state, logits = prefill(model, prompts)
    roots = logits.argmax(-1)
    tree = TokenTree(roots.unsqueeze(1), torch.full((2, 1), -1), torch.zeros(2, 1))
    out = tree_forward(model, tree, state)
    commit(state, torch.full((2, 1), -1))
    for r, p in enumerate(prompts):
        want = plain_logits(model, [*p, int(roots[r])])[-1]
        torch.testing.assert_close(out[r, 0], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", KEYS[::2], ids=IDS[::2])
def test_batch_equals_each_request_alone(key: tuple[str, str]) -> None:
    model = MODELS[key]
    gen = torch.Generator().manual_seed(2)
    prompts = prompts_of(gen, [3, 12, 1, 7])
    trees = [random_tree(gen, n, VOCAB) for n in (5, 2, 7, 1)]
    state, first = prefill(model, prompts)
    out = tree_forward(model, TokenTree.stack(trees), state)
    for r, (p, t) in enumerate(zip(prompts, trees, strict=True)):
        alone, first_alone = prefill(model, [p])
        torch.testing.assert_close(first[r], first_alone[0], atol=ATOL, rtol=0)
        out_alone = tree_forward(model, t, alone)
        n = t.max_nodes
        torch.testing.assert_close(out[r, :n], out_alone[0], atol=ATOL, rtol=0)


def plain_beam(
    model: Any, seqs: list[list[int]], roots: torch.Tensor, depth: int, width: int
) -> SubTree:
    """grow_tree with logits from a plain forward of every frontier node's full path."""

    def logits_fn(grower: TreeGrower) -> torch.Tensor:
        tree = grower.tree()
        return torch.stack(
            [
                torch.stack(
                    [
                        plain_logits(model, seqs[r] + path_tokens(tree, r, int(i)))[-1]
                        for i in grower.frontier[r]
                    ]
                )
                for r in range(len(seqs))
            ]
        )

    return grow_tree(roots, logits_fn, depth, width)


@pytest.mark.parametrize("key", KEYS[::2], ids=IDS[::2])
def test_draft_with_a_vocabulary_subset_grows_the_tree_of_its_full_logits(
    key: tuple[str, str],
) -> None:
    """grow_draft_tree ranks a SubsetHead draft over its K columns (scores_only): the same
    tree as a beam over the draft's plain (V-wide, -inf elsewhere) logits."""
    model: Any = copy.deepcopy(MODELS[key])
    vocab = torch.arange(1, VOCAB, 3)
    model.set_output_embeddings(SubsetHead(model.get_output_embeddings(), vocab))
    gen = torch.Generator().manual_seed(4)
    seqs = prompts_of(gen, [3, 9, 6])
    state, logits = prefill(model, seqs)
    assert logits.shape[-1] == VOCAB  # outside grow_draft_tree: the usual V logits
    roots = logits.argmax(-1)
    widths: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[-1]))
    try:
        out = grow_draft_tree(model, state, roots, depth=3, width=2)
    finally:
        handle.remove()
    assert widths == [vocab.numel()] * 3  # every level scored its K columns alone
    ref = plain_beam(model, seqs, roots, 3, 2)
    assert torch.equal(out.candidates.tokens, ref.tree.tokens)
    assert torch.equal(out.candidates.parents, ref.tree.parents)
    torch.testing.assert_close(out.candidates.logp, ref.tree.logp, atol=1e-4, rtol=0)
    assert bool(torch.isin(out.candidates.tokens[:, 1:], vocab).all())
    # a model whose forward bypasses its output module returns V logits even so: the
    # tree is grown over them (the same tree)
    state, _ = prefill(model, seqs)
    forward = type(model).forward

    def bypass(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        if out.logits.shape[-1] != VOCAB:  # what the full head would have returned
            full = torch.full((*out.logits.shape[:-1], VOCAB), float("-inf"))
            out.logits = full.index_copy(-1, vocab, out.logits)
        return out

    model.forward = bypass.__get__(model)
    out = grow_draft_tree(model, state, roots, depth=3, width=2)
    assert torch.equal(out.candidates.tokens, ref.tree.tokens)


@pytest.mark.parametrize("key", KEYS[::2], ids=IDS[::2])
def test_draft_tree_matches_plain_beam_across_steps(key: tuple[str, str]) -> None:
    """Draft trees == a beam over plain forwards, step after step, with backlogged leaves."""
    model = MODELS[key]
    gen = torch.Generator().manual_seed(3)
    seqs = prompts_of(gen, [3, 9, 6])
    state, logits = prefill(model, seqs)
    roots = logits.argmax(-1)
    backlogged = 0
    for _step in range(2):
        out = grow_draft_tree(model, state, roots, depth=3, width=2)
        ref = plain_beam(model, seqs, roots, 3, 2)
        assert torch.equal(out.candidates.tokens, ref.tree.tokens)
        assert torch.equal(out.candidates.parents, ref.tree.parents)
        torch.testing.assert_close(out.candidates.logp, ref.tree.logp, atol=1e-4, rtol=0)
        cand = out.candidates
        # the target verifies a selected subtree; map its accepted path back to candidates
        selected = build_optimal(cand, 6)
        # row 0: its deepest selected node (depth 3: never forwarded by the draft);
        # row 1: nothing; row 2: a depth-1 node
        targets = [int(selected.tree.depth[0].argmax()), 0, 1]
        sel_paths = []
        for r, node in enumerate(targets):
            p = path_to(selected.tree[r], torch.tensor([node]))[0].tolist()
            sel_paths.append([i for i in p[1:] if i >= 0])
        accepted = map_accepted(pad_paths(sel_paths), selected.kept)
        before = state.lens.clone()
        commit_draft(state, out, accepted)
        for r in range(3):
            acc = [int(i) for i in accepted[r] if i >= 0]
            seqs[r] = seqs[r] + [int(roots[r])] + cand.tokens[r, acc].tolist()
            # cached now + backlog == the emitted count
            n_backlog = int((state.backlog[r] >= 0).sum())
            assert int(state.lens[r]) + n_backlog == int(before[r]) + 1 + len(acc)
            backlogged += n_backlog
        roots = torch.randint(0, VOCAB, (3,), generator=gen)
    assert backlogged > 0  # the next step forwarded a backlogged leaf before its root


@pytest.mark.parametrize("spare", [False, True], ids=["copied", "spare-slots"])
@pytest.mark.parametrize("key", KEYS[::2], ids=IDS[::2])
def test_draft_tree_on_a_shared_prefix_matches_plain_beam_and_leaves_the_owner_alone(
    key: tuple[str, str], spare: bool
) -> None:
    """Trees grown on share_prefix(state) == a beam over plain forwards; state unchanged
    (its spare slots aside), and its next tree forward as if no tree had been grown."""
    model = MODELS[key]
    seqs = prompts_of(torch.Generator().manual_seed(5), [3, 9, 6])
    state, logits = prefill(model, seqs)
    roots = logits.argmax(-1)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache_layers(state)]
    lens = state.lens.clone()
    for _ in range(2):  # twice on one state: the first growth left nothing behind
        view = share_prefix(state, spare=spare)
        out = grow_draft_tree(model, view, roots, depth=3, width=2)
        # the view appended into the owner's buffers, or into copies of its own
        shared = cache_layers(view)[0].keys.data_ptr() == cache_layers(state)[0].keys.data_ptr()
        assert shared == spare
        ref = plain_beam(model, seqs, roots, 3, 2)
        assert torch.equal(out.candidates.tokens, ref.tree.tokens)
        torch.testing.assert_close(out.candidates.logp, ref.tree.logp, atol=1e-4, rtol=0)
        assert torch.equal(state.lens, lens)
        assert state.pending == 0
        for (k, v), layer in zip(before, cache_layers(state), strict=True):
            if spare:  # each request's prefix (its slots from its length on are free)
                for r, n in enumerate(lens.tolist()):
                    assert torch.equal(k[r, :, :n], layer.keys[r, :, :n])
                    assert torch.equal(v[r, :, :n], layer.values[r, :, :n])
            else:
                assert torch.equal(k, layer.keys)
                assert torch.equal(v, layer.values)
    # the owner then verifies a tree as usual (over the slots the view wrote)
    fresh, _ = prefill(model, seqs)
    expected = tree_forward(model, out.candidates, fresh)
    assert torch.equal(tree_forward(model, out.candidates, state), expected)
    with pytest.raises(ValueError, match="uncommitted"):
        share_prefix(state)


def test_shares_cache_compares_layouts_and_values() -> None:
    llama = MODELS[("llama", "sdpa")]
    assert shares_cache(llama, llama)
    assert shares_cache(llama, MODELS[("llama", "eager")])  # same weights, other attention
    apart = tiny_model("llama", sliding_window=WINDOW, seed=8)
    assert not shares_cache(llama, apart)
    assert shares_cache(llama, apart, tol=None)  # the layout alone
    assert not shares_cache(llama, tiny_model("llama", num_layers=3, seed=7), tol=None)
    assert not shares_cache(llama, copy.deepcopy(llama).double(), tol=None)  # dtypes differ
    assert not shares_cache(llama, MODELS[("gemma3", "sdpa")], tol=None)  # a sliding window
    for bad in (0.0, True):
        with pytest.raises(ValueError, match="tol"):
            shares_cache(llama, llama, tol=bad)
    short = tiny_model("llama", seed=7)
    config: Any = short.config
    config.max_position_embeddings = 16  # the probe fits the model's positions
    assert shares_cache(short, short)


def test_select_keeps_requests() -> None:
    model = MODELS[("llama", "sdpa")]
    prompts = prompts_of(torch.Generator().manual_seed(4), [3, 8, 5])
    state, _ = prefill(model, prompts)
    sub = state.select([2, 0])
    assert sub.lens.tolist() == [5, 3]
    assert sub.capacity == 5
    out = tree_forward(model, TokenTree.stack([TokenTree([9], [-1], [0.0])] * 2), sub)
    for r, p in enumerate([prompts[2], prompts[0]]):
        torch.testing.assert_close(out[r, 0], plain_logits(model, [*p, 9])[-1], atol=ATOL, rtol=0)


def test_bad_input_is_rejected() -> None:
    model = MODELS[("llama", "sdpa")]
    state, _ = prefill(model, [[1, 2], [3]])
    one = TokenTree([5], [-1], [0.0])
    with pytest.raises(ValueError, match="requests"):
        tree_forward(model, one, state)
    with pytest.raises(ValueError, match="no pending tree"):
        commit(state, torch.tensor([[-1], [-1]]))
    tree = TokenTree.stack([TokenTree([5, 6], [-1, 0], [0.0, -1.0])] * 2)
    tree_forward(model, tree, state)
    with pytest.raises(ValueError, match="uncommitted"):
        tree_forward(model, tree, state)
    with pytest.raises(ValueError, match=r"\[1, 2\)"):
        commit(state, torch.tensor([[2], [-1]]))
    with pytest.raises(ValueError, match="right"):
        commit(state, torch.tensor([[-1, 1], [-1, -1]]))
    with pytest.raises(ValueError, match="shape"):
        commit(state, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="at least one token"):
        prefill(model, [[1], []])
    with pytest.raises(TypeError, match="KVState"):
        tree_forward(model, tree, "cache")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arch"):
        tiny_model("gpt2")
    with pytest.raises(ValueError, match="num_requests"):
        KVState.empty(0)
    long, _ = prefill(model, [[1] * 1020])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tree_forward(
            model, TokenTree([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3], [0.0, -1, -2, -3, -4]), long
        )


def test_importing_adaspec_does_not_import_transformers() -> None:
    import os

    import adaspec

    src = os.path.dirname(os.path.dirname(adaspec.__file__))
    env = {**os.environ, "PYTHONPATH": src}
    code = "import sys, adaspec, adaspec.tree, adaspec.acceptance; "
    code += "print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


def test_draft_growth_stops_when_a_level_cannot_pay() -> None:
    draft = tiny_model(seed=1)
    grown, pending = {}, {}
    for min_gain in (0.0, 3.0):  # 3 > R: no level can add that many accepted tokens
        state, logits = prefill(draft, [[1, 2, 3], [4, 5]])
        out = grow_draft_tree(draft, state, logits.argmax(-1), depth=4, width=2, min_gain=min_gain)
        grown[min_gain], pending[min_gain] = int(out.grown.depth.max()), state.pending
    assert grown[0.0] == 4
    assert pending[0.0] == 1 + 2 * 3  # root + 3 forwarded levels of 2
    assert (grown[3.0], pending[3.0]) == (1, 1)  # the root's forward only
    state, logits = prefill(draft, [[1, 2]])
    with pytest.raises(ValueError, match="min_gain"):
        grow_draft_tree(draft, state, logits.argmax(-1), depth=2, width=1, min_gain=-1.0)


def test_draft_growth_asks_stop_before_each_further_level() -> None:
    draft = tiny_model(seed=1)
    state, logits = prefill(draft, [[1, 2, 3], [4, 5]])
    seen: list[tuple[int, tuple[int, ...]]] = []

    def stop(tree: TokenTree, frontier: torch.Tensor) -> bool:
        seen.append((int(tree.depth.max()), tuple(frontier.shape)))
        return int(tree.depth.max()) == 2  # grow two levels, then stop

    out = grow_draft_tree(draft, state, logits.argmax(-1), depth=5, width=2, stop=stop)
    assert seen == [(1, (2, 2)), (2, (2, 2))]
    assert int(out.grown.depth.max()) == 2
    assert state.pending == 1 + 2  # root + one forwarded level of 2: depth 2 is not forwarded
    with pytest.raises(TypeError, match="stop"):
        grow_draft_tree(draft, state, logits.argmax(-1), depth=2, width=1, stop=3)  # type: ignore[arg-type]

"""The adapter on the real shipped pairs (marker ``models``): oracles are plain forwards.

Each pair is loaded once per session (the first load converts its GGUF into the user
cache: ~20 s for SmolLM2, ~60 s for Gemma). Prompts and trees are small to keep the
whole file within a few minutes on two cores.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from adaspec.acceptance import TreeGrower, grow_tree
from adaspec.models import (
    PAIRS,
    commit,
    commit_draft,
    grow_draft_tree,
    load_pair,
    prefill,
    share_prefix,
    shares_cache,
    tree_argmax,
    tree_forward,
)
from adaspec.models import loading as loading_module
from adaspec.models.prompts import chat_prompt_ids, humaneval_prompts, mtbench_questions
from adaspec.tree import TokenTree, is_leaf, path_to
from tests.conftest import loaded_pair
from tests.models_oracles import (
    cache_layers,
    path_tokens,
    plain_cache,
    plain_logits,
    random_path,
    random_tree,
)

pytestmark = pytest.mark.models

NAMES = list(PAIRS)
Pair = tuple[str, Any, Any, Any]  # name, target, draft, tokenizer
_LOADED: dict[str, Pair] = {}


@pytest.fixture(scope="session", params=NAMES)
def pair(request: pytest.FixtureRequest) -> Pair:
    name = request.param
    if name not in _LOADED:
        _LOADED[name] = (name, *loaded_pair(name))  # shared with the other real-model tests
    return _LOADED[name]


def budget(logits: torch.Tensor) -> float:
    """Error budget: float32 rounding of ~1e-6 relative, amplified through the layers.

    Observed ~5e-5 on logits of size ~30 for both pairs; 20x margin.
    """
    return 3e-5 * float(logits.abs().max())


def short_prompts(tok: Any, texts: list[str]) -> list[list[int]]:
    return [chat_prompt_ids(tok, t) for t in texts]


def check_tree_logits(model: Any, prompt: list[int], tree: TokenTree, out: torch.Tensor) -> None:
    """``out`` (N, V) of a one-row tree == plain forwards of prompt + each root->leaf path.

    One plain forward per leaf gives the logits of every node on its path.
    """
    leaves = is_leaf(tree)[0].nonzero().flatten().tolist()
    for leaf in leaves:
        path = path_to(tree, torch.tensor([leaf]))[0].tolist()
        ref = plain_logits(model, prompt + tree.tokens[0, path].tolist(), last=len(path))
        for j, node in enumerate(path):
            expect = ref[j]
            torch.testing.assert_close(out[node], expect, atol=budget(expect), rtol=0)
            assert int(out[node].argmax()) == int(expect.argmax())


def test_tree_forward_equals_per_path_forwards_in_a_mixed_batch(pair: Pair) -> None:
    _name, target, _, tok = pair
    gen = torch.Generator().manual_seed(0)
    V = int(target.config.vocab_size)
    prompts = short_prompts(tok, ["What are the primary colors?", "Hi", "Name a fruit."])
    prompts[1] = prompts[1][-3:]  # lengths differ a lot: e.g. 30 / 3 / 28 tokens
    state, first = prefill(target, prompts)
    trees = [random_tree(gen, n, V) for n in (5, 3, 1)]
    out = tree_forward(target, TokenTree.stack(trees), state)  # [3, 5, V]
    for r in range(3):
        check_tree_logits(target, prompts[r], trees[r], out[r])
    # each request alone gives the same logits as in the batch, prefill included
    for r in range(3):
        alone, first_alone = prefill(target, [prompts[r]])
        torch.testing.assert_close(first[r], first_alone[0], atol=budget(first_alone), rtol=0)
        out_alone = tree_forward(target, trees[r], alone)
        n = trees[r].max_nodes
        torch.testing.assert_close(out[r, :n], out_alone[0], atol=budget(out_alone), rtol=0)


def test_commit_then_decode_equals_plain_forward(pair: Pair) -> None:
    _name, target, _, tok = pair
    gen = torch.Generator().manual_seed(1)
    V = int(target.config.vocab_size)
    seqs = short_prompts(tok, ["Tell me a joke.", "Why is the sky blue? Answer briefly."])
    state, _logits = prefill(target, seqs)
    for _ in range(2):
        # a beam-shaped tree under the target's own greedy choice, so accepted paths are real
        trees = [random_tree(gen, 5, V) for _ in range(2)]
        tree = TokenTree.stack(trees)
        tree_forward(target, tree, state)
        paths = [random_path(gen, t) for t in trees]
        width = max(1, *(len(p) for p in paths))
        accepted = torch.tensor([p + [-1] * (width - len(p)) for p in paths])
        before = state.lens.clone()
        new = commit(state, accepted)
        assert new.tolist() == [int(b) + 1 + len(p) for b, p in zip(before, paths, strict=True)]
        for r in range(2):
            seqs[r] = seqs[r] + trees[r].tokens[0, [0, *paths[r]]].tolist()
    root = TokenTree(torch.tensor([[11], [12]]), torch.full((2, 1), -1), torch.zeros(2, 1))
    out = tree_forward(target, root, state)
    for r, seq in enumerate(seqs):
        ref = plain_logits(target, [*seq, 11 + r], last=1)[-1]
        torch.testing.assert_close(out[r, 0], ref, atol=budget(ref), rtol=0)
        assert int(out[r, 0].argmax()) == int(ref.argmax())
    # the cache itself equals a plain forward's (last layer, where errors are largest)
    for r, seq in enumerate(seqs):
        k, v = plain_cache(target, seq)[-1]
        layer = cache_layers(state)[-1]
        torch.testing.assert_close(layer.keys[r, :, : len(seq)], k, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(layer.values[r, :, : len(seq)], v, atol=1e-3, rtol=1e-3)


def test_tree_argmax_is_the_targets_own_greedy_choice(pair: Pair) -> None:
    """The bfloat16-screened argmax (a float32 target's output layer is never fully
    projected) equals the argmax of plain forwards at every node of real-text trees;
    only a near-tie (top-2 gap within float32 rounding) may differ, and is counted."""
    _name, target, draft, tok = pair
    prompts = short_prompts(tok, ["Write a haiku about the sea.", "def add(a, b):"])
    state, first = prefill(target, prompts)
    # the draft's beam over the real continuation: trees the engine would verify
    dtree = grow_draft_tree(draft, share_prefix(state), first.argmax(-1), depth=3, width=2)
    tree = dtree.candidates
    chosen = tree_argmax(target, tree, state)  # [2, N]
    near_ties = checked = 0
    for r in range(2):
        for node in range(int(tree.num_nodes[r])):
            path = path_tokens(tree, r, node)
            ref = plain_logits(target, prompts[r] + path, last=1)[-1]
            top2 = ref.topk(2).values
            checked += 1
            if int(chosen[r, node]) != int(ref.argmax()):
                assert float(top2[0] - top2[1]) <= budget(ref), (r, node)
                near_ties += 1
    assert checked >= 10, checked
    assert near_ties <= 1, near_ties


def test_draft_grows_the_plain_beam_and_commits(pair: Pair) -> None:
    """The tree grown through the cache == a beam over plain forwards (the float target
    stands in for the draft: the int8 draft quantizes activations per call, so its logits
    depend on what else is in the batch); then the real draft grows and commits."""
    _name, target, draft, tok = pair
    prompts = short_prompts(tok, ["Count to five.", "Say hello."])
    state, logits = prefill(target, prompts[:1])
    roots = logits.argmax(-1)
    out = grow_draft_tree(target, state, roots, depth=3, width=2)

    def logits_fn(grower: TreeGrower) -> torch.Tensor:
        tree = grower.tree()
        return torch.stack(
            [
                torch.stack(
                    [
                        plain_logits(target, prompts[r] + path_tokens(tree, r, int(i)), last=1)[-1]
                        for i in grower.frontier[r]
                    ]
                )
                for r in range(1)
            ]
        )

    ref = grow_tree(roots, logits_fn, 3, 2)
    assert torch.equal(out.candidates.tokens, ref.tree.tokens)
    torch.testing.assert_close(out.candidates.logp, ref.tree.logp, atol=1e-3, rtol=0)

    dstate, dlogits = prefill(draft, prompts)
    dtree = grow_draft_tree(draft, dstate, dlogits.argmax(-1), depth=4, width=3)
    assert dtree.candidates.max_nodes == 13
    # accept the greedy chain (node 1, its best child, ...) down to the deepest level
    cand = dtree.candidates
    path, node = [], 0
    for _ in range(4):
        kids = [i for i in range(cand.max_nodes) if int(cand.parents[0, i]) == node]
        if not kids:
            break
        node = kids[0]
        path.append(node)
    accepted = torch.tensor([path, [-1] * len(path)])
    before = dstate.lens.clone()
    commit_draft(dstate, dtree, accepted)
    emitted = dstate.lens - before + (dstate.backlog >= 0).sum(1)
    assert emitted.tolist() == [1 + len(path), 1]


@pytest.mark.parametrize("name", ["gemma-3-270m"])
def test_gemma_past_its_sliding_window(name: str) -> None:
    """A prefix longer than Gemma's 512-token window: sliding layers must drop old keys."""
    name, target, _, tok = _LOADED.get(name) or (name, *load_pair(name))
    _LOADED[name] = (name, target, _, tok)
    window = int(target.config.sliding_window)
    text = " ".join(humaneval_prompts(12))
    long = tok(text).input_ids[: window + 12]
    assert len(long) == window + 12
    prompts = [long, long[:20]]
    state, _ = prefill(target, prompts)
    tree = TokenTree.stack([TokenTree([5, 6, 7, 8], [-1, 0, 0, 1], [0.0, -1.0, -2.0, -3.0])] * 2)
    out = tree_forward(target, tree, state)
    for r in range(2):
        check_tree_logits(target, prompts[r], tree[r], out[r])


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_load_cold_and_warm_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_network(monkeypatch)
    cold = load_pair("smollm2-135m")
    assert cold.path.parent.parent == tmp_path
    assert (cold.path / "adaspec.json").is_file()
    assert not [p for p in tmp_path.glob("models/.*")]  # no leftover temporary folder

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm cache must not convert again")

    monkeypatch.setattr(loading_module, "_convert", no_conversion)
    target, _draft, tok = load_pair("smollm2-135m")
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, cold.target(ids).logits)
    # the tokenizer fixes of MODELS.md: no BOS, eos = pad = <|im_end|> (id 2)
    assert tok("Hello").input_ids == [19556]
    assert tok.eos_token_id == 2
    assert tok.pad_token_id == 2


def test_gemma_tokenizer_adds_bos_and_the_pair_makes_sense() -> None:
    name, target, draft, tok = _LOADED.get("gemma-3-270m") or (
        "gemma-3-270m",
        *load_pair("gemma-3-270m"),
    )
    _LOADED[name] = (name, target, draft, tok)
    ids = tok("The primary colors are").input_ids
    assert ids[0] == tok.bos_token_id == 2
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, len(ids) :])
    assert any(c in text.lower() for c in ("red", "blue", "yellow", "green")), text


def test_prompt_sets_load_and_format(pair: Pair) -> None:
    name, _, _, tok = pair
    questions = mtbench_questions()
    assert len(questions) == 80
    assert all(len(q["turns"]) == 2 for q in questions)
    coding = humaneval_prompts()
    assert len(coding) == 164
    assert coding[0].startswith("from typing import List")
    ids = chat_prompt_ids(tok, questions[0]["turns"][0])
    text = tok.decode(ids)
    assert questions[0]["turns"][0] in text
    if name == "smollm2-135m":
        assert text.endswith("<|im_start|>assistant\n")
    else:
        assert ids[0] == tok.bos_token_id


def test_smollm2_draft_runs_the_targets_own_4bit_weights(pair: Pair) -> None:
    """The default int4w draft: every layer of a Q4_1 target becomes an Int4Linear whose
    grid holds the target's weights (bfloat16 scales and zeros aside); the Q8_0 output
    layer (and every Gemma-3 layer that int4 would round more than int8) stays int8."""
    from adaspec.models.fast import Int4Linear, Int8Linear, _int8_quantize

    name, target, draft, _ = pair
    layers = {n: m for n, m in draft.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert not any(type(m) is torch.nn.Linear for m in draft.modules())
    if name != "smollm2-135m":
        assert any(isinstance(m, Int8Linear) for m in layers.values())
        return
    assert isinstance(layers.pop("lm_head"), Int8Linear)
    assert layers
    assert all(isinstance(m, Int4Linear) for m in layers.values())
    qkv = layers["model.layers.0.qkv_proj"]  # q, k and v merged (fused layers)
    attn = target.get_submodule("model.layers.0.self_attn")
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    int4_mse = float((qkv.dense.weight.float() - w).square().mean())
    int8_mse = float((_int8_quantize(w)[2] - w).square().mean())
    # int8 per channel rounds by up to half of max|w| / 127; the 4-bit grid only by
    # bfloat16 rounding of its scales, zeros and the dense copy
    assert int4_mse < int8_mse / 10


def test_the_shipped_drafts_draft_on_the_targets_cache(pair: Pair) -> None:
    """load_pair's drafts are the target's weights, quantized: their keys and values are
    close enough to the target's that the engine lets them draft on its cache, and doing
    so leaves the target's cache as it was."""
    _name, target, draft, tok = pair
    assert shares_cache(target, draft)  # on its probe: at most 0.022 (SmolLM2), 0.101 (Gemma)
    state, logits = prefill(target, short_prompts(tok, ["Count to five.", "Say hello."]))
    before = [layer.keys.clone() for layer in cache_layers(state)]
    dtree = grow_draft_tree(draft, share_prefix(state), logits.argmax(-1), depth=3, width=1)
    assert dtree.candidates.max_nodes == 4
    for k, layer in zip(before, cache_layers(state), strict=True):
        assert torch.equal(k, layer.keys)

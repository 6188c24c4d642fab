"""compact_kv against a per-request Python loop, on accepted paths taken from real trees."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from adaspec.kernels import compact_kv, compact_kv_layers
from adaspec.tree import TokenTree, path_to


def python_compact(cache: Tensor, lens: Tensor, accepted: Tensor) -> tuple[Tensor, list[int]]:
    """The obvious per-request loop: copy each accepted node's slot after the root's."""
    out = cache.clone()
    new_lens = []
    for r in range(cache.shape[0]):
        n = int(lens[r])
        path = [int(a) for a in accepted[r] if a >= 0]
        for j, node in enumerate(path):
            out[r, :, n + 1 + j] = cache[r, :, n + node]
        new_lens.append(n + 1 + len(path))
    return out, new_lens


def random_accepted(R: int, N: int, gen: torch.Generator) -> Tensor:
    """(R, A) accepted paths (root excluded, -1 padded) ending at a random node of a random tree."""
    u = torch.rand(R, N, generator=gen, dtype=torch.float64)
    parents = (u * torch.arange(N, dtype=torch.float64)).floor().to(torch.int64)
    parents[:, 0] = -1
    logp = -0.1 * torch.arange(N, dtype=torch.float32).expand(R, N).clone()
    tree = TokenTree(tokens=torch.zeros(R, N, dtype=torch.int64), parents=parents, logp=logp)
    last = torch.randint(0, N, (R,), generator=gen)
    return path_to(tree, last)[:, 1:]  # drop the root column


@pytest.mark.parametrize("N", [1, 2, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_python_loop_and_length_invariant(N: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(N)
    R, H, D = 5, 3, 8
    lens = torch.tensor([0, 1, 17, 4, 30])
    S = int(lens.max()) + N + 2
    k = torch.randn(R, H, S, D, generator=gen).to(dtype)
    v = torch.randn(R, H, S, D, generator=gen).to(dtype)
    for trial in range(5):
        accepted = random_accepted(R, N, gen)
        want_k, want_lens = python_compact(k, lens, accepted)
        want_v, _ = python_compact(v, lens, accepted)
        k_ptr = k.data_ptr()
        new_lens = compact_kv(k, v, lens, accepted)
        assert k.data_ptr() == k_ptr  # in place
        # the cache grows by exactly the emitted count: root + accepted (bonus is the next root)
        emitted = (accepted >= 0).sum(1) + 1
        assert new_lens.tolist() == want_lens == (lens + emitted).tolist(), trial
        for r in range(R):
            n = want_lens[r]
            assert torch.equal(k[r, :, :n], want_k[r, :, :n])
            assert torch.equal(v[r, :, :n], want_v[r, :, :n])


def test_layers_match_python_loop_and_chains_move_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    R, H, D, N = 4, 2, 4, 12
    lens = torch.tensor([0, 5, 2, 9])
    S = int(lens.max()) + N + 1
    layers = [(torch.randn(R, H, S, D, generator=gen), torch.randn(R, H, S, D, generator=gen))]
    layers.append((torch.randn(R, H, S + 3, D, generator=gen), torch.randn(R, H, S + 3, D)))
    for trial in range(6):
        accepted = random_accepted(R, N, gen)
        want = [
            (python_compact(k, lens, accepted), python_compact(v, lens, accepted))
            for k, v in layers
        ]
        new_lens = compact_kv_layers(layers, lens, accepted)
        for (k, v), ((wk, wl), (wv, _)) in zip(layers, want, strict=True):
            assert new_lens.tolist() == wl, trial
            for r in range(R):
                assert torch.equal(k[r, :, : wl[r]], wk[r, :, : wl[r]])
                assert torch.equal(v[r, :, : wl[r]], wv[r, :, : wl[r]])
    # a chain accepted from its first node on is already in place: nothing is written
    versions = [(k._version, v._version) for k, v in layers]
    chain = torch.tensor([[1, 2, -1], [-1, -1, -1], [1, 2, 3], [1, -1, -1]])
    assert compact_kv_layers(layers, lens, chain).tolist() == [3, 6, 6, 11]
    assert [(k._version, v._version) for k, v in layers] == versions
    with pytest.raises(ValueError, match="at least one"):
        compact_kv_layers([], lens, chain)
    with pytest.raises(ValueError, match="every layer"):
        compact_kv_layers([*layers, (torch.zeros(R + 1, H, S, D),) * 2], lens, chain)


def test_no_accepted_columns_and_all_rejected() -> None:
    k = torch.randn(2, 1, 6, 4)
    v = k.clone()
    before = k.clone()
    lens = torch.tensor([2, 0])
    assert compact_kv(k, v, lens, torch.empty(2, 0, dtype=torch.int64)).tolist() == [3, 1]
    assert compact_kv(k, v, lens, torch.full((2, 3), -1)).tolist() == [3, 1]
    assert torch.equal(k, before)


def test_overlapping_moves_read_before_write() -> None:
    # path 0 -> 2 -> 3 -> 4: slot of node 3 is written (from node 2's) before node 3 is moved on
    k = torch.arange(10.0).reshape(1, 1, 10, 1)
    v = k.clone()
    new = compact_kv(k, v, torch.tensor([1]), torch.tensor([[2, 3, 4]]))
    assert new.tolist() == [5]
    assert k.flatten()[:5].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]


def test_bad_inputs() -> None:
    k = torch.zeros(2, 1, 6, 4)
    lens = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        compact_kv(k, k[:, :, :5], lens, torch.full((2, 1), -1))
    with pytest.raises(ValueError, match="cache_lens"):
        compact_kv(k, k.clone(), lens.float(), torch.full((2, 1), -1))
    with pytest.raises(ValueError, match="accepted must be an"):
        compact_kv(k, k.clone(), lens, torch.full((3, 1), -1))
    with pytest.raises(ValueError, match="node indices >= 1"):
        compact_kv(k, k.clone(), lens, torch.tensor([[0], [-1]]))
    with pytest.raises(ValueError, match="inside the cache"):
        compact_kv(k, k.clone(), lens, torch.tensor([[5], [-1]]))
    with pytest.raises(ValueError, match="padded on the right"):
        compact_kv(k, k.clone(), lens, torch.tensor([[-1, 2], [-1, -1]]))


def test_accepted_out_of_path_order_is_rejected():
    k = torch.zeros(1, 1, 8, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        compact_kv(k, k.clone(), torch.tensor([1]), torch.tensor([[3, 1]]))

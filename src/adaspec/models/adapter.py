"""Running token trees through transformers causal LMs: prefill, tree forward, commit.

Cache layout
------------
All R requests share one transformers ``DynamicCache`` whose layers hold keys and values of
shape (R, H, S, D). Prefixes are **left-aligned**: request r's committed tokens sit in slots
``[0, lens[r])`` and slot s holds position s. While a step is under way, the tree nodes
forwarded so far (``pending`` of them, the same count for every request) sit right after
the prefix: node i of request r in slot ``lens[r] + i``. Slots past ``lens[r] + pending``
are stale for request r (other requests are longer) and every mask hides them; S is always
``max(lens) + pending``.

transformers appends new keys at the end of the cache (slot S), so after each forward the
new entries are moved to ``lens[r] + pending + q``, where the layout above wants them; the
attention of that forward already saw them at the end, with the mask built for that.

The cache layers append into spare slots of a larger buffer (``_SlackLayer``) rather
than concatenating: a ``DynamicCache`` copies every layer's whole cache at each forward,
which a step of several draft levels and a verification pays several times (a decode
step of 32 requests of ~220 tokens: SmolLM2 367 -> 278 ms, Gemma-3 221 -> 195 ms;
``python benchmarks/bench_models.py --cache``).

Masks are additive float (0 visible, the dtype's minimum hidden) of shape
(R, 1, Q, S + Q). A boolean 4D mask is silently wrong with eager attention in
transformers, so none is ever passed. Models with sliding-window layers (Gemma-2/3) get a
dict of masks, one per layer type, the sliding one also hiding keys ``window`` or more
positions behind the query; this is exact at any length (no sliding cache layer is used,
so the cache keeps every key).

The state object :class:`KVState` is owned by the caller; the functions here update it in
place and never keep references to it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adaspec.kernels import compact_kv_layers
from adaspec.models.greedy import finite_argmax, greedy_head
from adaspec.tree import TokenTree, ancestor_mask

__all__ = ["KVState", "commit", "prefill", "tree_argmax", "tree_forward"]


class _SlackLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # (transformers' hook)
    """A ``DynamicLayer`` that appends into spare slots instead of concatenating.

    ``keys`` and ``values`` are (R, H, S, D) views of the first S slots of (R, H, C, D)
    buffers, C >= S. An update of Q slots writes them into slots S .. S + Q - 1 of the
    buffer when they fit and the tensors are still those views (shortening them by slicing,
    as a crop does, keeps them views); otherwise it copies everything into a new buffer
    with about a quarter (at least 64 slots) to spare. A crop followed by an update thus
    overwrites the dropped slots: a tensor taken from the layer before is a view, not a
    snapshot (clone it to keep it).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._slack: dict[str, Tensor] = {}

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._slack = {}
        self.keys = self._append("keys", self.keys, key_states)
        self.values = self._append("values", self.values, value_states)
        return self.keys, self.values

    def _append(self, name: str, old: Tensor | None, new: Tensor) -> Tensor:
        Q = new.shape[-2]
        kept = old if old is not None and old.dim() == 4 else None  # (empty before any update)
        buffer = self._slack.get(name)
        if kept is not None and buffer is not None and _appendable(kept, buffer, Q):
            S = kept.shape[-2]
            buffer[:, :, S : S + Q].copy_(new)
            return buffer[:, :, : S + Q]
        S = 0 if kept is None else kept.shape[-2]
        R, H, _, D = new.shape
        buffer = new.new_empty(R, H, S + Q + max(64, (S + Q) // 4), D)
        if kept is not None:
            buffer[:, :, :S].copy_(kept)
        buffer[:, :, S : S + Q].copy_(new)
        self._slack[name] = buffer
        return buffer[:, :, : S + Q]


def _appendable(x: Tensor, buffer: Tensor, extra: int) -> bool:
    """Whether ``x`` is the first slots of ``buffer`` (same rows, heads, dims) with room for
    ``extra`` more, which may be written here (a buffer made under
    ``torch.inference_mode()`` is written only under it)."""
    return (
        (not buffer.is_inference() or torch.is_inference_mode_enabled())
        and x.data_ptr() == buffer.data_ptr()
        and x.stride() == buffer.stride()
        and x.shape[:2] == buffer.shape[:2]
        and x.shape[3] == buffer.shape[3]
        and x.dtype == buffer.dtype
        and x.shape[2] + extra <= buffer.shape[2]
    )


def _new_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers are ``_SlackLayer`` (created on first use)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlackLayer
    return cache


def _shared_cache(cache: DynamicCache, *, spare: bool = False) -> DynamicCache:
    """A cache over the same tensors as ``cache``. Its updates never write the slots
    ``cache`` holds: by default its layers forget their spare slots, so the first update
    copies into buffers of their own; with ``spare`` they append into ``cache``'s spare
    slots (beyond its tensors' ends) while those last, without a copy."""
    shared = copy.copy(cache)
    shared.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in shared.layers:
        if isinstance(layer, _SlackLayer) and layer.is_initialized:
            layer._slack = dict(layer._slack) if spare else {}
    return shared


@dataclass(eq=False)
class KVState:
    """One model's KV cache for a batch of R requests, in the layout of this module.

    Attributes
    ----------
    cache : transformers.DynamicCache
        Layers of keys/values (R, H, S, D), S = ``max(lens) + pending``.
    lens : Tensor
        (R,) int64 committed tokens per request (the prefix; slot s = position s).
    pending : int
        Tree nodes forwarded this step, in slots ``lens + i`` (0 between steps).
    pending_pos : Tensor
        (R, pending) int64 positions of those nodes (``lens + depth``).
    backlog : Tensor
        (R, B) int64 tokens committed but not yet in the cache, -1 padded on the right
        (the draft side: an accepted node of the deepest level was never forwarded by the
        draft); they are forwarded before the next root.
    """

    cache: DynamicCache
    lens: Tensor
    pending: int = 0
    pending_pos: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))
    backlog: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))

    @classmethod
    def empty(cls, num_requests: int, device: torch.device | str = "cpu") -> KVState:
        """A state with no cached tokens for ``num_requests`` requests."""
        if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
            raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")
        dev = torch.device(device)
        return cls(
            _new_cache(),
            torch.zeros(num_requests, dtype=torch.int64, device=dev),
            0,
            torch.zeros(num_requests, 0, dtype=torch.int64, device=dev),
            torch.zeros(num_requests, 0, dtype=torch.int64, device=dev),
        )

    @property
    def num_requests(self) -> int:
        return int(self.lens.shape[0])

    @property
    def capacity(self) -> int:
        """S, the slots per request in the cache tensors (``max(lens) + pending``)."""
        return int(self.lens.max()) + self.pending

    def select(self, rows: Tensor | list[int]) -> KVState:
        """A new state holding only requests ``rows`` (e.g. to drop finished requests)."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.lens.device)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"rows must be a non-empty 1-D list of request indices, got {rows}")
        if bool(((idx < 0) | (idx >= self.num_requests)).any()):
            raise ValueError(f"rows must lie in [0, {self.num_requests}), got {idx.tolist()}")
        lens = self.lens[idx]
        keep = int(lens.max()) + self.pending
        cache = _new_cache()
        for i, layer in enumerate(_layers(self)):
            # (indexing rows copies; the update copies once more, into a buffer with slack)
            cache.update(layer.keys[idx, :, :keep], layer.values[idx, :, :keep], i)
        return KVState(cache, lens, self.pending, self.pending_pos[idx], self.backlog[idx])


def _layers(state: KVState) -> list[Any]:
    """The cache layers that hold keys (all of them once anything was forwarded)."""
    layers: list[Any] = list(state.cache.layers)
    return [layer for layer in layers if getattr(layer, "keys", None) is not None]


def _attention_config(model: nn.Module) -> tuple[int | None, list[str] | None, int | None]:
    """(sliding window, layer types, max positions) of a model's text config.

    The window is None when no layer slides; layer types None when every layer slides.
    """
    config: Any = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    max_pos = int(max_pos) if max_pos is not None else None
    if window is None or (types is not None and "sliding_attention" not in types):
        return None, None, max_pos
    return int(window), list(types) if types is not None else None, max_pos


def _forward_block(
    model: nn.Module,
    state: KVState,
    tokens: Tensor,
    positions: Tensor,
    visible: Tensor,
    logits_at: Tensor | None = None,
    row_last: Tensor | None = None,
    argmax: bool = False,
) -> Tensor:
    """Forward Q new nodes per request after the prefix and the ``pending`` nodes.

    ``tokens``, ``positions``: (R, Q) int64. ``visible``: (R, Q, pending + Q) bool, which of
    the pending nodes and of the new nodes each new node attends to (the prefix is always
    visible). Returns logits (R, Q, V) float32, or (R, K, V) at the K query indices
    ``logits_at`` (1-D int64) only, which skips most of a large vocabulary's projection,
    or (R, 1, V) at each request's own query index ``row_last`` ((R,) int64): only R rows are
    projected, however different the requests' lengths (V: the output module's width, K
    for a :class:`~adaspec.models.vocab.SubsetHead` in ``scores_only`` mode). With
    ``argmax``: (R, Q) (or (R, 1)) int64 the argmax of those logits instead, -1 for a row
    that is not finite, through a :class:`~adaspec.models.greedy.GreedyHead` where the
    output layer allows (its float32 logits are then never all computed).
    Afterwards the new nodes are pending nodes
    ``pending .. pending + Q - 1`` in the layout of the module docstring.
    """
    R, Q = tokens.shape
    dev = tokens.device
    window, types, max_pos = _attention_config(model)
    if max_pos is not None and Q > 0 and int(positions.max()) >= max_pos:
        raise ValueError(
            f"position {int(positions.max())} is past the model's max_position_embeddings "
            f"({max_pos}): requests this long are not supported"
        )
    P = state.capacity
    lens = state.lens
    pend = state.pending
    slot = torch.arange(P, device=dev)  # [P]
    old_vis = (slot < lens.unsqueeze(1)).unsqueeze(1).expand(R, Q, P)  # [R, Q, P] the prefix
    kv_pos = slot.unsqueeze(0).expand(R, P)  # [R, P] positions of prefix slots
    if pend > 0:
        rel = slot.unsqueeze(0) - lens.unsqueeze(1)  # [R, P] node index of pending slots
        in_pend = (rel >= 0) & (rel < pend)
        idx = rel.clamp(0, pend - 1)
        pend_vis = visible[:, :, :pend].gather(2, idx.unsqueeze(1).expand(R, Q, P))
        old_vis = old_vis | (pend_vis & in_pend.unsqueeze(1))
        kv_pos = torch.where(in_pend, state.pending_pos.gather(1, idx), kv_pos)
    vis = torch.cat([old_vis, visible[:, :, pend:]], dim=2)  # [R, Q, P + Q]
    kv_pos = torch.cat([kv_pos, positions], dim=1)  # [R, P + Q]

    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    hidden = torch.finfo(dtype).min

    def additive(v: Tensor) -> Tensor:
        return torch.zeros(v.shape, dtype=dtype, device=dev).masked_fill_(~v, hidden).unsqueeze(1)

    mask: Tensor | dict[str, Tensor] | None
    if (
        Q == 1
        and bool(vis.all())
        and (window is None or bool((positions.unsqueeze(2) - kv_pos.unsqueeze(1) < window).all()))
    ):
        # one new token per request that sees the whole cache (a decode step without
        # padding): the model's own causal mask is this, and attention skips the mask
        mask = None
    elif window is None:
        mask = additive(vis)  # [R, 1, Q, P + Q]
    else:
        near = positions.unsqueeze(2) - kv_pos.unsqueeze(1) < window  # [R, Q, P + Q]
        slide = additive(vis & near)
        mask = (
            slide
            if types is None
            else {"full_attention": additive(vis), "sliding_attention": slide}
        )

    head = _output_head(model) if row_last is not None or argmax else None
    chooser = greedy_head(head) if argmax and head is not None and _raw_logits(model) else None
    handle = None
    fired: list[bool] = []
    captured: list[Tensor] = []  # the output layer's input, when the chooser replaces it
    if head is not None and (row_last is not None or chooser is not None):
        rows = torch.arange(R, device=dev)

        def pick_rows(_: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            if not args or args[0].dim() != 3:  # not the (R, Q, H) call this expects
                return None
            fired.append(True)
            h = args[0]
            if row_last is not None:
                h = h[rows, row_last].unsqueeze(1)  # [R, 1, H]
            if chooser is not None:
                captured.append(h)
                h = h[:, :0]  # the layer projects nothing
            return (h, *args[1:])

        handle = head.register_forward_pre_hook(pick_rows)
    try:
        with torch.no_grad():
            out = model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=state.cache,
                use_cache=True,
                logits_to_keep=0 if logits_at is None or head is not None else logits_at,
            )
    finally:
        if handle is not None:
            handle.remove()
    # move the new entries from the end (slot P + q) to lens[r] + pend + q
    if bool((lens != lens.max()).any()):
        dst = (lens.unsqueeze(1) + pend + torch.arange(Q, device=dev)).view(R, 1, Q, 1)
        index: dict[tuple[int, ...], Tensor] = {}  # per (R, H, Q, D) shape of the new entries
        for layer in _layers(state):
            for name in ("keys", "values"):
                cache = getattr(layer, name)  # [R, H, P + Q, D]
                new = cache[:, :, P:]
                at = index.get(new.shape)
                if at is None:
                    at = index[new.shape] = dst.expand(new.shape)
                # source and destination may overlap: copy the new entries out first (one
                # scatter along the slots: 4x quicker than indexing rows and slots)
                cache.scatter_(2, at, new.clone())
    state.pending = pend + Q
    state.pending_pos = torch.cat([state.pending_pos, positions], dim=1)
    # the cache is now max(lens) + pending long: no slot past it was written
    if captured:
        assert chooser is not None
        return chooser(captured[0])  # [R, Q] (or [R, 1])
    logits: Tensor = out.logits.float()  # [R, Q, V] (or [R, 1, V] projected by the hook)
    if row_last is not None and not fired:
        # the model never called its output module (or has none): pick from every position
        logits = logits[torch.arange(R, device=dev), row_last].unsqueeze(1)  # [R, 1, V]
    elif fired and logits.shape[1] != 1:
        raise RuntimeError(
            f"the output module was called with the picked rows but the model returned logits "
            f"of shape {tuple(logits.shape)}; pass row_last=None for this model"
        )
    return finite_argmax(logits) if argmax else logits


def _raw_logits(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer's, untransformed: softcapping or a
    logit scale, monotone as they are, can turn float32 near-ties into exact ties, which
    the argmax of the transformed logits breaks by the lowest id (Gemma-2's softcapping).
    """
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        return False
    return all(
        getattr(config, name, None) in (None, 1) for name in ("logit_scale", "logits_scaling")
    )


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module that projects hidden states to logits (transformers' output embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _crop(state: KVState) -> None:
    keep = state.capacity
    for layer in _layers(state):
        if layer.keys.shape[-2] != keep:
            layer.keys = layer.keys[:, :, :keep]
            layer.values = layer.values[:, :, :keep]


def _check_state(state: KVState, name: str = "state") -> None:
    if not isinstance(state, KVState):
        raise TypeError(f"{name} must be a KVState, got {type(state).__name__}")


def _as_chains(
    sequences: Tensor | list[list[int]] | list[Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Right-padded (R, C) int64 token chains and their (R,) lengths from a list or tensor."""
    if isinstance(sequences, Tensor):
        if sequences.dim() != 2 or sequences.dtype != torch.int64:
            raise ValueError(
                "prompts must be an (R, L) int64 tensor or a list of lists, got "
                f"{sequences.dtype} {tuple(sequences.shape)}"
            )
        seqs = list(sequences)
    else:
        seqs = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in sequences]
    if len(seqs) == 0 or any(s.numel() == 0 for s in seqs):
        raise ValueError("prompts must hold at least one request, each with at least one token")
    counts = torch.tensor([s.numel() for s in seqs], dtype=torch.int64, device=device)
    chains = torch.zeros(len(seqs), int(counts.max()), dtype=torch.int64, device=device)
    for r, s in enumerate(seqs):
        chains[r, : s.numel()] = s.to(device)
    if bool((chains < 0).any()):
        raise ValueError("prompts must hold token ids >= 0")
    return chains, counts


def _extend(
    model: nn.Module,
    state: KVState,
    chains: Tensor,
    counts: Tensor,
    keep_last: bool,
    argmax: bool = False,
) -> Tensor:
    """Append per-request chains of tokens after each prefix; logits at each chain's last token.

    With ``keep_last`` the last token of each chain stays pending as node 0 (a tree root);
    otherwise the whole chain is committed. Returns (R, V) float32 logits (the output
    module's width, see :func:`_forward_block`), or with ``argmax`` their (R,) int64 argmax.
    """
    if state.pending != 0:
        raise ValueError("the state has an uncommitted tree; call commit() first")
    R, C = chains.shape
    dev = chains.device
    k = torch.arange(C, device=dev)
    real = k.unsqueeze(0) < counts.unsqueeze(1)  # [R, C]
    causal = k.unsqueeze(0) <= k.unsqueeze(1)  # [C, C]
    # padding positions see only themselves: no row of the mask is empty
    visible = (causal.unsqueeze(0) & real.unsqueeze(1)) | torch.eye(C, dtype=torch.bool, device=dev)
    positions = state.lens.unsqueeze(1) + k  # [R, C]
    # only each chain's last position needs logits: project those rows alone (or, for a
    # model without an output-embedding module, the K <= R distinct last indices)
    if _output_head(model) is not None:
        out = _forward_block(
            model, state, chains, positions, visible, row_last=counts - 1, argmax=argmax
        )[:, 0]
    else:
        last, which = torch.unique(counts - 1, return_inverse=True)
        logits = _forward_block(model, state, chains, positions, visible, last)  # [R, K, V]
        out = logits[torch.arange(R, device=dev), which]  # [R, V]
        if argmax:
            out = finite_argmax(out)
    if keep_last:
        state.lens = state.lens + counts - 1
        state.pending = 1
        state.pending_pos = state.lens.unsqueeze(1).clone()
    else:
        state.lens = state.lens + counts
        state.pending = 0
        state.pending_pos = state.pending_pos[:, :0]
    _crop(state)
    return out


def prefill(
    model: nn.Module,
    prompts: Tensor | list[list[int]] | list[Tensor],
    state: KVState | None = None,
    *,
    argmax: bool = False,
) -> tuple[KVState, Tensor]:
    """Forward R prompts of different lengths into a (new) cache; logits at each last token.

    Parameters
    ----------
    model : transformers causal LM
    prompts : list of R token-id lists / 1-D tensors, or an (R, L) int64 tensor
        The tokens to append to each request's cache (the whole prompt for a new state).
    state : KVState, optional
        Extend this state instead of starting an empty one (it must have no pending tree).
    argmax : bool
        Return the logits' (R,) int64 argmax instead (ties: the lowest id; -1 for a row
        that is not finite), chosen as :func:`tree_argmax` chooses: a greedy first token
        without projecting every logit in float32.

    Returns
    -------
    (KVState, Tensor)
        The state (lens increased by each prompt's length) and the (R, V) float32 logits of
        the next token after each prompt (or, with ``argmax``, their (R,) argmax).

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> state, logits = prefill(model, [[1, 2, 3], [4, 5]])
    >>> state.lens.tolist(), tuple(logits.shape)
    ([3, 2], (2, 101))
    """
    dev = next(model.parameters()).device
    chains, counts = _as_chains(prompts, dev)
    if state is None:
        state = KVState.empty(chains.shape[0], dev)
    _check_state(state)
    if state.num_requests != chains.shape[0]:
        raise ValueError(
            f"prompts has {chains.shape[0]} requests but the state has {state.num_requests}"
        )
    return state, _extend(model, state, chains, counts, keep_last=False, argmax=argmax)


def tree_forward(model: nn.Module, tree: TokenTree, state: KVState) -> Tensor:
    """Forward R token trees (root first) against each request's cached prefix in one call.

    Node i of request r attends to the whole prefix of r and to its own ancestors in the
    tree (and itself), at position ``state.lens[r] + depth[r, i]``. Afterwards node i's
    keys/values sit in slot ``state.lens[r] + i`` and ``state.pending == N``; call
    :func:`commit` to keep the accepted path.

    Parameters
    ----------
    model : transformers causal LM (llama-, gemma3-style; sdpa or eager attention)
    tree : TokenTree
        R trees of N nodes; node 0 is the root (the last committed token, not yet cached).
    state : KVState
        The model's cache for the same R requests, with no pending tree.

    Returns
    -------
    Tensor
        (R, N, V) float32 logits of the next token after every node (padding rows are
        meaningless).

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> state, _ = prefill(model, [[1, 2, 3]])
    >>> tree = TokenTree([7, 8, 9], [-1, 0, 0], [0.0, -0.5, -1.0])
    >>> tuple(tree_forward(model, tree, state).shape), state.pending
    ((1, 3, 101), 3)
    """
    return _tree_block(model, tree, state, argmax=False)


def tree_argmax(model: nn.Module, tree: TokenTree, state: KVState) -> Tensor:
    """:func:`tree_forward` for greedy verification: the argmax of each node's logits only.

    The same forward, cache layout and errors as :func:`tree_forward`; returns (R, N) int64
    the target's greedy next token after every node (ties: the lowest id; -1 for a row that
    is not finite, and meaningless for padding nodes). A float32 output layer without
    bias (``nn.Linear`` or :class:`~adaspec.models.fast.FastLinear`) is then never
    projected in full: a :class:`~adaspec.models.greedy.GreedyHead` chooses from a
    bfloat16 pass with a proven error bound (half the bytes; Gemma-3 270M's forward of
    4 trees of 10 nodes is about a fifth quicker). A model whose config softcaps or
    scales its logits (monotone, but able to turn float32 near-ties into exact ties) is
    projected in full, as is one whose output layer is not on the CPU.

    Example
    -------
    >>> from adaspec.models import tiny_model
    >>> model = tiny_model(seed=0)
    >>> tree = TokenTree([7, 8, 9], [-1, 0, 0], [0.0, -0.5, -1.0])
    >>> a, _ = prefill(model, [[1, 2, 3]])
    >>> b, _ = prefill(model, [[1, 2, 3]])
    >>> bool(torch.equal(tree_argmax(model, tree, a), tree_forward(model, tree, b).argmax(-1)))
    True
    """
    return _tree_block(model, tree, state, argmax=True)


def _tree_block(model: nn.Module, tree: TokenTree, state: KVState, *, argmax: bool) -> Tensor:
    _check_state(state)
    if not isinstance(tree, TokenTree):
        raise TypeError(f"tree must be a TokenTree, got {type(tree).__name__}")
    if tree.num_requests != state.num_requests:
        raise ValueError(
            f"tree has {tree.num_requests} requests but the state has {state.num_requests}"
        )
    if state.pending != 0:
        raise ValueError("the state already holds an uncommitted tree; call commit() first")
    if state.backlog.shape[1] > 0 and bool((state.backlog >= 0).any()):
        raise ValueError(
            "the state has a backlog of uncached tokens (a draft state); use grow_draft_tree"
        )
    dev = state.lens.device
    tree = tree.to(dev)
    positions = state.lens.unsqueeze(1) + tree.depth  # [R, N]
    return _forward_block(model, state, tree.tokens, positions, ancestor_mask(tree), argmax=argmax)


def commit(state: KVState, accepted: Tensor) -> Tensor:
    """Keep only the root and the accepted path of the pending tree, right after the prefix.

    Afterwards the cache equals the one a plain decode of the prefix + root + accepted
    tokens produces, ``state.lens`` grows by 1 + (accepted count) and nothing is pending.

    Parameters
    ----------
    state : KVState
        A state after :func:`tree_forward` (or :func:`~adaspec.models.grow_draft_tree`).
    accepted : Tensor
        (R, A) int64 accepted node indices in path order, excluding the root, -1 padded on
        the right (the verification result). Indices must lie in ``[1, state.pending)``.

    Returns
    -------
    Tensor
        (R,) int64 the new ``state.lens``.
    """
    _check_state(state)
    if state.pending == 0:
        raise ValueError("the state has no pending tree to commit")
    accepted = torch.as_tensor(accepted, dtype=torch.int64, device=state.lens.device)
    if accepted.dim() != 2 or accepted.shape[0] != state.num_requests:
        raise ValueError(
            f"accepted must have shape ({state.num_requests}, A), got {tuple(accepted.shape)}"
        )
    valid = accepted >= 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("accepted must be -1 padded on the right only")
    if bool(((accepted[valid] < 1) | (accepted[valid] >= state.pending)).any()):
        raise ValueError(
            f"accepted must hold node indices in [1, {state.pending}) (the root is kept anyway), "
            f"got {accepted.tolist()}"
        )
    lens = state.lens
    new_lens = compact_kv_layers(
        [(layer.keys, layer.values) for layer in _layers(state)], lens, accepted
    )
    state.lens = new_lens
    state.pending = 0
    state.pending_pos = state.pending_pos[:, :0]
    _crop(state)
    return new_lens

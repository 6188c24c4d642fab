"""Forward costs of the real pairs on CPU, the draft choice, and the linear-layer kernels.

Prints three tables:

1. per pair, the median time of one target (and draft) ``tree_forward`` of 1, 16, 32, 64
   tree tokens after a 256-token prefix, the ratio to the 1-token forward, and one draft
   beam step (a ``width``-token frontier forward) - the figures that set the token budget
   and tree shape on CPU;
2. per pair and draft kind, the argmax agreement a with the target along the target's own
   greedy continuations of MT-bench and HumanEval prompts, the per-token decode cost c
   relative to the target, and the speedup over plain decoding of a depth-k chain under
   i.i.d. acceptance, (1 + a + ... + a^k) / (k c + v(k + 1)), v(n) the measured cost of
   a target forward of n tokens relative to one decode step;
3. (``--linear`` alone) F.linear against each way of :class:`adaspec.models.fast.FastLinear`
   for the layer shapes of the shipped pairs, by row count;
4. (``--cache`` alone) one target decode step and one draft level of R real prompts with
   adaspec's cache layers (appending into spare slots) against transformers'
   ``DynamicCache`` (appending by concatenation), alternating, by batch size;
5. (``--argmax`` alone) one target forward of R real prompts x N tree nodes returning
   every logit (``tree_forward``) against returning the argmaxes only (``tree_argmax``,
   a bfloat16 pass screened by a proven bound), alternating; the argmaxes must agree;
6. (``--share`` alone) a draft step (a chain of ``--depth`` levels) on a view of the
   target's cache after R real prompts: ``share_prefix`` copying the cache at the first
   level against ``spare=True`` (the tree in the target's free slots), alternating.

Run: ``python benchmarks/bench_models.py`` (``--help`` for options). Timings are medians;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaspec.models import (
    KVState,
    commit,
    commit_draft,
    grow_draft_tree,
    load_pair,
    make_draft,
    prefill,
    share_prefix,
    tree_argmax,
    tree_forward,
)
from adaspec.models.greedy import greedy_head
from adaspec.models.prompts import chat_prompt_ids, humaneval_prompts, mtbench_questions
from adaspec.tree import TokenTree


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def star_tree(root: int, n: int, vocab: int, gen: torch.Generator) -> TokenTree:
    """A tree of n nodes, 4 children per node breadth first (a beam-like shape)."""
    parents = [-1] + [(i - 1) // 4 for i in range(1, n)]
    tokens = [root, *torch.randint(0, vocab, (n - 1,), generator=gen).tolist()]
    return TokenTree(tokens, parents, [0.0] + [-float(i) for i in range(1, n)])


def forward_table(name: str, sizes: list[int], prefix: int, width: int, repeats: int) -> None:
    target, draft, _ = load_pair(name)
    vocab = int(target.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefix,), generator=gen).tolist()
    print(f"\n{name}: one forward after a {prefix}-token prefix, R = 1 (median of {repeats})")
    from adaspec.models.fast import plain_linears

    plain = plain_linears(copy.deepcopy(target))  # the same weights through F.linear
    print(f"{'model':>8} {'tokens':>7} {'ms':>9} {'x 1-token':>10}")
    for label, model in (("target", target), ("F.linear", plain), ("draft", draft)):
        state, _ = prefill(model, [prompt])
        base = None
        for n in sizes:
            tree = star_tree(1, n, vocab, gen)

            def step(
                model: nn.Module = model, tree: TokenTree = tree, state: KVState = state
            ) -> None:
                tree_forward(model, tree, state)
                commit(state, torch.full((1, 1), -1, dtype=torch.int64))  # keeps the root only

            t = median_time(step, repeats)
            base = base or t
            print(f"{label:>8} {n:>7} {t * 1e3:>9.1f} {t / base:>10.2f}")
    state, _ = prefill(draft, [prompt])
    root = torch.tensor([1])

    def grow(depth: int) -> None:
        out = grow_draft_tree(draft, state, root, depth=depth, width=width)
        commit_draft(state, out, torch.full((1, 1), -1, dtype=torch.int64))

    one = median_time(lambda: grow(1), repeats)
    four = median_time(lambda: grow(4), repeats)
    print(
        f"draft grow: depth 1 (root forward) {one * 1e3:.1f} ms; depth 4, width {width}: "
        f"{four * 1e3:.1f} ms; one beam step ({width}-token frontier) "
        f"{(four - one) / 3 * 1e3:.1f} ms"
    )


def greedy_continuations(target: Any, prompts: list[list[int]], new: int) -> list[list[int]]:
    out = []
    for p in prompts:
        with torch.no_grad():
            seq = target.generate(
                torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0
            )
        out.append(seq[0].tolist())
    return out


def chain(n: int) -> TokenTree:
    return TokenTree([1] * n, [-1, *range(n - 1)], [-float(i) for i in range(n)])


def decode_costs(
    models: dict[str, tuple[nn.Module, int]], prompt: list[int], repeats: int
) -> dict[str, float]:
    """Median time of one forward of an n-token chain (+ commit) per (model, n), interleaved.

    The entries take turns within each repetition so that load from other processes
    affects them alike.
    """
    states = {label: prefill(model, [prompt])[0] for label, (model, _) in models.items()}
    times: dict[str, list[float]] = {label: [] for label in models}
    for rep in range(repeats + 1):
        for label, (model, n) in models.items():
            start = time.perf_counter()
            tree_forward(model, chain(n), states[label])
            commit(states[label], torch.full((1, 1), -1, dtype=torch.int64))
            if rep > 0:  # the first round warms up
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def draft_table(name: str, n_prompts: int, new: int, repeats: int) -> None:
    pair = load_pair(name)  # target optimized for CPU, the default draft
    target: Any = pair.target
    tok = pair.tokenizer
    drafts: dict[str, nn.Module] = {
        "int8": make_draft(target, "int8"),
        "int4-sim": make_draft(target, "int4-sim"),
        "bf16": make_draft(target, "bf16"),
        "int8w": make_draft(target, "int8w"),
        "int4w": make_draft(target, "int4w"),
    }
    draft: Any = pair.draft
    sub = getattr(draft.get_output_embeddings(), "tokens", None)
    if sub is not None:  # the pair's default: int8w with a frequent-token vocabulary
        k = f"{sub.numel() // 1024}k"
        drafts[f"bf16+{k}"] = make_draft(target, "bf16", vocab=sub)
        drafts[f"int8w+{k}"] = make_draft(target, "int8w", vocab=sub)
        drafts[f"int4w+{k}"] = make_draft(target, "int4w", vocab=sub)
    texts = [q["turns"][0] for q in mtbench_questions(n_prompts)] + humaneval_prompts(n_prompts)
    prompts = [chat_prompt_ids(tok, t)[:200] for t in texts]
    seqs = greedy_continuations(target, prompts, new)

    def argmax_along(model: nn.Module, seq: list[int], start: int) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = model(input_ids=torch.tensor([seq])).logits[0]
        return logits[start - 1 : -1].argmax(-1)

    gen = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(0, int(target.config.vocab_size), (128,), generator=gen).tolist()
    models = {
        "target": (target, 1),
        "verify-3": (target, 3),
        "verify-5": (target, 5),
        **{label: (model, 1) for label, model in drafts.items()},
    }
    costs = decode_costs(models, decode_prompt, repeats)
    t_target = costs["target"]
    print(
        f"\n{name}: draft choice over {len(seqs)} prompts x {new} greedy target tokens; "
        f"target decode step {t_target * 1e3:.1f} ms"
    )
    v3, v5 = costs["verify-3"] / t_target, costs["verify-5"] / t_target
    print(f"target forward of 3 / 5 tokens: {v3:.2f} / {v5:.2f} x one decode step")
    print(f"{'draft':>10} {'agreement':>10} {'cost/target':>12} {'speedup k=2':>12} {'k=4':>6}")
    for label, model in drafts.items():
        agree = total = 0
        for p, seq in zip(prompts, seqs, strict=True):
            ref = argmax_along(target, seq, len(p))
            got = argmax_along(model, seq, len(p))
            agree += int((ref == got).sum())
            total += ref.numel()
        alpha = agree / total
        cost = costs[label] / t_target
        # a depth-k chain emits 1 + a + ... + a^k tokens (i.i.d. acceptance) for k draft
        # steps and one target forward of k + 1 tokens
        s2 = sum(alpha**i for i in range(3)) / (2 * cost + v3)
        s4 = sum(alpha**i for i in range(5)) / (4 * cost + v5)
        print(f"{label:>10} {alpha:>10.3f} {cost:>12.2f} {s2:>12.2f} {s4:>6.2f}")


def linear_table(repeats: int) -> None:
    """F.linear vs FastLinear's ways for the shapes of the shipped pairs, by row count."""
    from adaspec.models.fast import FastLinear

    shapes = [(2048, 640), (640, 2048), (1536, 576), (49_152, 576), (262_144, 640)]
    rows = [1, 2, 3, 4, 8, 16, 32]
    print(f"\nlinear layers, float32, median ms of {repeats}")
    print(f"{'out x in':>14} {'way':>10} " + " ".join(f"{'M=' + str(m):>8}" for m in rows))
    for out_f, in_f in shapes:
        layer = FastLinear(nn.Linear(in_f, out_f, bias=False, dtype=torch.float32))
        layer.requires_grad_(False)
        ways = ["linear", "packed"] + (["blocked", "transposed"] if out_f * in_f >= 1 << 22 else [])
        for way in ways:
            cells = []
            for m in rows:
                x = torch.randn(m, in_f)
                if way == "transposed" and m > 3:
                    cells.append(f"{'-':>8}")
                    continue
                fn = layer._ways()[way]  # type: ignore[index]
                t = median_time(functools.partial(fn, x), repeats)
                cells.append(f"{t * 1e3:>8.2f}")
            print(f"{f'{out_f}x{in_f}':>14} {way:>10} " + " ".join(cells))


def concatenating(state: KVState) -> KVState:
    """The same state in transformers' own ``DynamicCache``, which appends by concatenation."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layers: list[Any] = list(state.cache.layers)
    for i, layer in enumerate(layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return KVState(
        cache, state.lens.clone(), state.pending, state.pending_pos.clone(), state.backlog.clone()
    )


def cache_table(name: str, batches: list[int], repeats: int) -> None:
    from adaspec.models.vocab import subset_scores

    target, draft, tok = load_pair(name)
    texts = [q["turns"][0] for q in mtbench_questions()] + humaneval_prompts()
    print(
        f"\n{name}: one forward of 1 token per request after R real prompts, adaspec's cache "
        f"layers vs DynamicCache, alternating (median ms of {repeats})"
    )
    print(f"{'model':>7} {'R':>4} {'prefix':>7} {'DynamicCache':>13} {'adaspec':>9} {'ratio':>6}")
    for R in batches:
        prompts = [chat_prompt_ids(tok, t) for t in texts[:R]]
        for label, model in (("target", target), ("draft", draft)):
            ours, _ = prefill(model, prompts)
            states = {"concat": concatenating(ours), "slack": ours}
            tree = TokenTree(
                torch.full((R, 1), 1), torch.full((R, 1), -1), torch.zeros(R, 1), validate=False
            )
            times: dict[str, list[float]] = {k: [] for k in states}
            # (a draft level scores its own columns only, as grow_draft_tree runs it)
            with subset_scores(model) if model is draft else contextlib.nullcontext():
                for rep in range(repeats + 1):
                    for key in list(states)[:: 1 if rep % 2 else -1]:
                        state = copy.deepcopy(states[key])
                        start = time.perf_counter()
                        tree_forward(model, tree, state)
                        if rep > 0:  # (the first round warms up)
                            times[key].append(time.perf_counter() - start)
            a, b = (statistics.median(times[k]) for k in states)
            print(
                f"{label:>7} {R:>4} {int(ours.lens.max()):>7} {a * 1e3:>13.1f} "
                f"{b * 1e3:>9.1f} {b / a:>6.2f}"
            )


def argmax_table(name: str, shapes: list[tuple[int, int]], repeats: int) -> None:
    target, _, tok = load_pair(name)
    texts = [q["turns"][0] for q in mtbench_questions()] + humaneval_prompts()
    gen = torch.Generator().manual_seed(0)
    V = int(target.config.vocab_size)
    print(
        f"\n{name}: one target forward of R real prompts x N tree nodes, every logit "
        f"(tree_forward) vs the argmaxes (tree_argmax), alternating (median ms of {repeats})"
    )
    print(f"{'R x N':>8} {'tree_forward':>13} {'tree_argmax':>12} {'ratio':>6} {'differ':>7}")
    for R, N in shapes:
        base, first = prefill(target, [chat_prompt_ids(tok, t) for t in texts[:R]])
        roots = first.argmax(-1).tolist()
        tree = TokenTree.stack([star_tree(r, N, V, gen) for r in roots])
        ways = {"forward": tree_forward, "argmax": tree_argmax}
        times: dict[str, list[float]] = {k: [] for k in ways}
        out: dict[str, torch.Tensor] = {}
        for rep in range(repeats + 1):
            for key in list(ways)[:: 1 if rep % 2 else -1]:
                state = copy.deepcopy(base)
                start = time.perf_counter()
                out[key] = ways[key](target, tree, state)
                if rep > 0:  # (the first round warms up)
                    times[key].append(time.perf_counter() - start)
        a, b = (statistics.median(times[k]) for k in ways)
        differ = int((out["forward"].argmax(-1) != out["argmax"])[tree.valid].sum())
        print(f"{f'{R} x {N}':>8} {a * 1e3:>13.1f} {b * 1e3:>12.1f} {b / a:>6.2f} {differ:>7}")
    head = greedy_head(target.get_output_embeddings())
    if head is not None and head.rows:
        print(
            f"float32 logits recomputed per row: {head.candidates / head.rows:.1f} "
            f"(rows projected in full: {head.full_rows} of {head.rows})"
        )


def share_table(name: str, batches: list[int], depth: int, repeats: int) -> None:
    target, draft, tok = load_pair(name)
    texts = [q["turns"][0] for q in mtbench_questions()] + humaneval_prompts()
    print(
        f"\n{name}: a draft chain of {depth} levels on a view of the target's cache after R "
        f"real prompts, the cache copied vs the target's free slots, alternating "
        f"(median ms of {repeats})"
    )
    print(f"{'R':>4} {'prefix':>7} {'copied':>8} {'spare':>8} {'ratio':>6}")
    for R in batches:
        state, first = prefill(target, [chat_prompt_ids(tok, t) for t in texts[:R]], argmax=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(repeats + 1):
            for spare in (False, True)[:: 1 if rep % 2 else -1]:
                start = time.perf_counter()
                grow_draft_tree(draft, share_prefix(state, spare=spare), first, depth, 1)
                if rep > 0:  # (the first round warms up)
                    times[spare].append(time.perf_counter() - start)
        a, b = (statistics.median(times[k]) for k in (False, True))
        print(f"{R:>4} {int(state.lens.max()):>7} {a * 1e3:>8.1f} {b * 1e3:>8.1f} {b / a:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 16, 32, 64])
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=4, help="MT-bench + HumanEval prompts each")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-drafts", action="store_true")
    parser.add_argument("--linear", action="store_true", help="only the linear-layer table")
    parser.add_argument("--cache", action="store_true", help="only the KV-cache table")
    parser.add_argument(
        "--batches", nargs="+", type=int, default=[1, 4, 32], help="(--cache, --share)"
    )
    parser.add_argument("--argmax", action="store_true", help="only the greedy-argmax table")
    parser.add_argument("--share", action="store_true", help="only the shared-cache table")
    parser.add_argument("--depth", type=int, default=2, help="(--share) levels")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["1x1", "4x1", "4x10", "16x1", "16x6", "32x1", "32x4"],
        help="(--argmax) R x N",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.linear:
        linear_table(args.repeats)
        return
    if args.cache:
        for name in args.pairs:
            cache_table(name, args.batches, args.repeats)
        return
    if args.share:
        for name in args.pairs:
            share_table(name, args.batches, args.depth, args.repeats)
        return
    if args.argmax:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        for name in args.pairs:
            argmax_table(name, [(r, n) for r, n in shapes], args.repeats)
        return
    for name in args.pairs:
        if not args.skip_forward:
            forward_table(name, args.sizes, args.prefix, args.width, args.repeats)
        if not args.skip_drafts:
            draft_table(name, args.prompts, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()

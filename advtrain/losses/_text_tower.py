"""A frozen open_clip text tower, chosen by name, and a cached, batched caption embedder.

Which text encoders reproduce AdvXL
-----------------------------------
AdvXL (arXiv 2401.04727, Sec. 3.3) trains the image model on web image-text data (LAION-400M, DataComp-1B) against
the text features of a CLIP text encoder that stays frozen, one trained with CLIPA (Li et al., arXiv 2305.07017;
the open_clip weights below are CLIPA-v2's, arXiv 2306.15658). The CLIPA encoders in open_clip are built with
:func:`load_text_tower` by name and pretrained tag:

==========================  ===============  ========  ==========  =====================================
open_clip name              pretrained tag   text dim  text width  notes
==========================  ===============  ========  ==========  =====================================
``ViT-L-14-CLIPA``          ``datacomp1b``   768       768         12 layers
``ViT-H-14-CLIPA``          ``datacomp1b``   1024      1024        24 layers
``ViT-bigG-14-CLIPA``       ``datacomp1b``   1280      1280        32 layers
``ViT-L-14-CLIPA-336``      ``datacomp1b``   768       768         the 336 px variants: same text
``ViT-H-14-CLIPA-336``      ``datacomp1b``,  1024      1024        architecture, weights from the
                            ``laion2b``                            336 px fine-tuning stage
``ViT-bigG-14-CLIPA-336``   ``datacomp1b``   1280      1280
==========================  ===============  ========  ==========  =====================================

Verified offline with open_clip 3.3.0: these (name, tag) pairs are in ``open_clip.list_pretrained()``, and
``open_clip.get_model_config(name)`` gives the dimensions above (text towers with 32-token contexts, last-token
pooling, no causal mask, and the ``bert-base-uncased`` WordPiece tokenizer). Not verified here: the weights
themselves (downloading them needs the network, from the Hugging Face hub), and the paper's own text: that the
text encoder is CLIPA-trained comes from the project's issue #4, and which size the paper paired with each image
model is not settled here; read Sec. 3.3 and its appendix before a reproduction. The CLIPA tokenizer is a Hugging Face
tokenizer, so ``open_clip.get_tokenizer`` needs the ``transformers`` package (not a dependency of advtrain); the
OpenAI-style BPE tokenizer of the other towers (and of :func:`tiny_text_tower`) ships inside open_clip.

Tests and examples use :func:`tiny_text_tower`, a randomly initialized 2-layer, 64-wide text transformer with the
standard CLIP BPE tokenizer: it runs offline in milliseconds and reproduces nothing.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tokenizer = Callable[[list[str]], Tensor]


class FrozenTextTower(nn.Module):
    r"""A frozen text encoder and its tokenizer: captions in, ``(N, D)`` text features out, never a gradient.

    Freezing is enforced three ways: every parameter has ``requires_grad=False``; the module stays in eval mode
    (``train()`` is overridden, so a parent's ``model.train()`` cannot switch on dropout); and ``forward`` runs under
    ``torch.no_grad()``, so its outputs have no graph even if a caller switches ``requires_grad`` back on.

    Args:
        encoder: maps ``(N, L)`` int64 tokens to ``(N, D)`` features: an open_clip ``TextTransformer`` /
            ``HFTextEncoder`` (``model.text`` of a ``CustomTextCLIP``), or any module with that contract.
        tokenizer: maps a list of ``N`` strings to ``(N, L)`` int64 tokens (``open_clip.get_tokenizer(name)``).
        name: a label for ``repr`` (e.g. ``"ViT-H-14-CLIPA:datacomp1b"``).

    Side effects:
        Freezes ``encoder`` in place (``requires_grad_(False)``, ``eval()``) and runs it once on ``[""]`` to read
        the feature dimension ``D``.

    Example:
        >>> tower = tiny_text_tower()
        >>> tower.train().training, tower.embed_dim
        (False, 32)
        >>> tower(tower.tokenize(["a photo of a cat."])).shape
        torch.Size([1, 32])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """

    def __init__(self, encoder: nn.Module, tokenizer: Tokenizer, *, name: str = "custom"):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module; got {type(encoder).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable; got {type(tokenizer).__name__}")
        self.encoder = encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        super().train(False)
        probe = self(self.tokenize([""]))
        if probe.ndim != 2 or probe.shape[0] != 1:
            raise ValueError(f"encoder must map (N, L) tokens to (N, D) features; got {tuple(probe.shape)} for N = 1")
        self.embed_dim = int(probe.shape[1])

    def train(self, mode: bool = True) -> FrozenTextTower:
        """Stays in eval mode whatever ``mode`` says: the tower is frozen."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.encoder.parameters():
            return t.device
        for t in self.encoder.buffers():
            return t.device
        return torch.device("cpu")

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """``(N, L)`` int64 tokens of ``texts`` on the tower's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(N, L)`` tokens to ``(N, D)`` unnormalized features, without a graph."""
        with torch.no_grad():
            return self.encoder(tokens)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def load_text_tower(
    name: str, *, pretrained: str | None = None, device: str | torch.device | None = None
) -> FrozenTextTower:
    r"""The frozen text tower of the open_clip model ``name`` (weights ``pretrained``), without its image tower.

    Builds the model with ``open_clip.create_model(name, pretrained=pretrained, force_custom_text=True)`` (which
    converts a standard CLIP checkpoint to the separate-text-tower layout), keeps ``model.text``, pairs it with
    ``open_clip.get_tokenizer(name)``, and freezes it (see :class:`FrozenTextTower`). The image tower is built and
    then released: peak memory is the whole model's. See the module docstring for the towers AdvXL used.

    Args:
        name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-H-14-CLIPA"``, or a name
            registered with ``open_clip.add_model_config``.
        pretrained: an open_clip pretrained tag (``open_clip.list_pretrained()``), e.g. ``"datacomp1b"``, or a
            checkpoint path; ``None`` leaves the weights randomly initialized (open_clip logs a warning).
        device: where to put the tower (default CPU).

    Returns:
        A :class:`FrozenTextTower`.

    Side effects:
        With a pretrained tag, open_clip downloads the weights into its cache (the Hugging Face hub cache) unless
        they are there already.

    Raises:
        RuntimeError, OSError: from open_clip, for an unknown name, or weights that are neither cached nor
            downloadable (e.g. with ``HF_HUB_OFFLINE=1``).
        ModuleNotFoundError: a Hugging Face tokenizer (the CLIPA towers) without ``transformers`` installed.
        TypeError: ``name`` not a str, or a model without a separate text tower.

    Example:
        >>> tower = load_text_tower("ViT-H-14-CLIPA", pretrained="datacomp1b", device="cuda")  # doctest: +SKIP
        >>> tower.embed_dim  # doctest: +SKIP
        1024

    References:
        Li et al., "CLIPA-v2: Scaling CLIP Training with 81.1% Zero-shot ImageNet Accuracy within a $10,000
        Budget", arXiv 2306.15658.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Sec. 3.3), arXiv 2401.04727.
    """
    import open_clip

    if not isinstance(name, str):
        raise TypeError(f"name must be an open_clip model name (str); got {type(name).__name__}")
    model = open_clip.create_model(name, pretrained=pretrained, device=device or "cpu", force_custom_text=True)
    text = getattr(model, "text", None)
    if not isinstance(text, nn.Module):
        raise TypeError(f"open_clip built a {type(model).__name__} for {name!r} without a separate text tower")
    del model  # the image tower and the logit scale go with it
    return FrozenTextTower(text, open_clip.get_tokenizer(name), name=f"{name}:{pretrained or 'random'}")


def tiny_text_tower(
    *,
    embed_dim: int = 32,
    width: int = 64,
    layers: int = 2,
    heads: int = 32,
    context_length: int = 16,
    attention_gain: float = 8.0,
    seed: int = 0,
) -> FrozenTextTower:
    r"""A tiny, randomly initialized open_clip text transformer, frozen: for tests and examples only.

    An ``open_clip.transformer.TextTransformer`` (causal, pooled at the end-of-text token, linear projection to
    ``embed_dim``) over the 49,408-token CLIP BPE vocabulary, with ``open_clip.SimpleTokenizer`` (its vocabulary
    ships inside open_clip: no network). About 3.3 M parameters at the defaults, almost all in the token embedding.

    Random weights carry no meaning, but a stand-in tower must still map different captions to clearly different
    directions, or an image model has nothing to learn. With open_clip's (CLIP's) initialization the attention of
    an untrained tower is near-uniform, so captions sharing a template (``a photo of a 3.``, ``a photo of a 4.``)
    get nearly collinear features (cosine 0.97 to 0.999). ``attention_gain`` multiplies the query and key
    projections at initialization, which makes the attention sharp and content-dependent, and many narrow heads
    average that out: at the defaults (seed 0) the captions of the 10 classes of each ``../shared/datasets`` folder
    have pairwise cosines between 0.36 and 0.91 (mean 0.6 to 0.8), the range of a trained CLIP tower's prompts.
    ``attention_gain=1`` is open_clip's initialization.

    Args:
        embed_dim: output feature dimension ``D``.
        width: transformer width (a multiple of ``heads``).
        layers: transformer depth.
        heads: attention heads.
        context_length: tokens per caption (longer captions are truncated).
        attention_gain: factor on the initial query and key projections, ``> 0``.
        seed: seeds the initialization (the global RNG state is saved and restored).

    Returns:
        A :class:`FrozenTextTower` on CPU.

    Raises:
        ValueError: non-positive sizes or gain, or ``width`` not divisible by ``heads``.

    Example:
        >>> a, b = tiny_text_tower(seed=1), tiny_text_tower(seed=1)
        >>> tokens = a.tokenize(["a photo of a 3."])
        >>> torch.equal(a(tokens), b(tokens))
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """
    import open_clip
    from open_clip.transformer import TextTransformer

    sizes = {"embed_dim": embed_dim, "width": width, "layers": layers, "heads": heads, "context_length": context_length}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{key} must be a positive int; got {value!r}")
    if width % heads:
        raise ValueError(f"width must be divisible by heads; got width={width}, heads={heads}")
    if not (isinstance(attention_gain, numbers.Real) and 0 < attention_gain < float("inf")):
        raise ValueError(f"attention_gain must be finite and > 0; got {attention_gain!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TextTransformer(
            context_length=context_length,
            vocab_size=49408,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=embed_dim,
        )
    with torch.no_grad():
        for block in encoder.transformer.resblocks:
            block.attn.in_proj_weight[: 2 * width].mul_(attention_gain)  # rows of W_q and W_k
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return FrozenTextTower(encoder, tokenizer, name=f"tiny-random-init(seed={seed})")


class TextCache(OrderedDict):
    """A least-recently-used ``str -> (D,) Tensor`` cache for :func:`embed_texts`; unbounded by default.

    Keep one cache per tower: the keys are the captions alone. Class prompts and repeated captions are embedded
    once; on web-scale captions, which rarely repeat, bound it with ``max_entries``.

    Args:
        max_entries: evict the least recently used entries beyond this many (``None``: never evict).

    Example:
        >>> cache = TextCache(max_entries=2)
        >>> cache["a"], cache["b"] = torch.zeros(1), torch.ones(1)
        >>> _ = cache["a"]; cache["c"] = torch.ones(1)
        >>> sorted(cache)
        ['a', 'c']
    """

    def __init__(self, *, max_entries: int | None = None):
        super().__init__()
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, numbers.Integral) or max_entries <= 0
        ):
            raise ValueError(f"max_entries must be a positive int or None; got {max_entries!r}")
        self.max_entries = max_entries

    def __getitem__(self, key: str) -> Tensor:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key: str, value: Tensor) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if self.max_entries is not None:
            while len(self) > self.max_entries:
                self.popitem(last=False)


def embed_texts(
    tower: FrozenTextTower,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    cache: MutableMapping[str, Tensor] | None = None,
) -> Tensor:
    r"""L2-normalized text features of ``texts``, embedded in batches, each distinct string once.

    .. math::
        g_n = \frac{T(\mathrm{tok}(s_n))}{\|T(\mathrm{tok}(s_n))\|_2},

    for the frozen tower :math:`T`. The distinct strings not already in ``cache`` are tokenized and encoded in
    chunks of ``batch_size`` under ``torch.no_grad()``; repeated captions (and class prompts reused across calls,
    with a ``cache``) are encoded once.

    Args:
        tower: a :class:`FrozenTextTower`.
        texts: ``N`` captions (a list or tuple of ``str``, not a single ``str``).
        batch_size: captions per forward pass, ``>= 1``.
        cache: a ``str -> (D,)`` mapping (a :class:`TextCache` or a ``dict``) read before encoding and updated after.

    Returns:
        ``(N, D)`` float32 features on the tower's device, unit-norm rows, ``requires_grad=False``, row ``n`` for
        ``texts[n]``.

    Raises:
        TypeError: ``tower`` not a :class:`FrozenTextTower`, ``texts`` a ``str`` or holding non-strings.
        ValueError: ``batch_size < 1``.

    Side effects:
        Writes the newly encoded strings' features into ``cache`` (when given).

    Example:
        >>> tower, cache = tiny_text_tower(), TextCache()
        >>> g = embed_texts(tower, ["a photo of a 1.", "a photo of a 2.", "a photo of a 1."], cache=cache)
        >>> g.shape, len(cache), torch.equal(g[0], g[2])
        (torch.Size([3, 32]), 2, True)

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """
    if not isinstance(tower, FrozenTextTower):
        raise TypeError(f"tower must be a FrozenTextTower (see load_text_tower); got {type(tower).__name__}")
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list or tuple of str; got {type(texts).__name__}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must hold only str; got {len(bad)} items of type {sorted(set(bad))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    device = tower.device
    distinct = list(dict.fromkeys(texts))
    # read every hit before writing anything: a bounded cache may evict while the new features go in
    table = {t: cache[t].to(device) for t in distinct if t in cache} if cache is not None else {}
    missing = [t for t in distinct if t not in table]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        features = F.normalize(tower(tower.tokenize(chunk)).float(), dim=1)
        for text, feature in zip(chunk, features.unbind(0)):
            table[text] = feature
            if cache is not None:
                cache[text] = feature
    if not texts:
        return torch.zeros(0, tower.embed_dim, device=device)
    return torch.stack([table[t] for t in texts])

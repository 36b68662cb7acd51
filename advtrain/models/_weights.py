"""Load a state dict into a model strictly, whatever wrapper saved it, and report every key that did not match."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

#: Prefixes that wrappers put in front of a model's own keys: DDP / DataParallel (``module.``), ``torch.compile``
#: (``_orig_mod.``), the recipes' ``Normalized`` wrapper (``inner.``), RobustBench / timm EMA wrappers
#: (``model.``, ``module.``) and common feature-extractor wrappers.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "inner.", "model.", "net.", "backbone.", "base_model.")

#: Keys under which checkpoints keep their state dict, tried in this order (``{"model": sd, "optim": ...}``).
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "module", "net", "model_state_dict", "model_state")


class WeightsReport(NamedTuple):
    """What :func:`load_weights` did: every key that loaded, was missing, unexpected, mismatched or ignored."""

    loaded: tuple[str, ...]  # model keys that received a checkpoint tensor
    missing: tuple[str, ...]  # model keys the checkpoint lacks
    unexpected: tuple[str, ...]  # checkpoint keys the model lacks
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, checkpoint shape, model shape)
    ignored: tuple[str, ...]  # checkpoint entries dropped by ``ignore`` or because they are not tensors
    prefixes: tuple[str, ...]  # wrapper prefixes stripped from the checkpoint keys, in order
    container: tuple[str, ...]  # the keys followed to reach the state dict, e.g. ("model",)
    sha256: str | None  # of the file, when loaded from a path

    def ok(self) -> bool:
        """True when every model key loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts, then every missing, unexpected and mismatched key."""
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.container:
            parts.append(f"from checkpoint[{']['.join(repr(c) for c in self.container)}]")
        if self.prefixes:
            parts.append(f"prefixes stripped {list(self.prefixes)}")
        parts.append(f"{len(self.missing)} missing {list(self.missing)}")
        parts.append(f"{len(self.unexpected)} unexpected {list(self.unexpected)}")
        mm = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        parts.append(f"{len(mm)} shape-mismatched {mm}")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored {list(self.ignored)}")
        return "; ".join(parts)


class WeightsMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model; ``.report`` holds every key."""

    def __init__(self, message: str, report: WeightsReport):
        super().__init__(message)
        self.report = report


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in chunks (checkpoints of ViT-H are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """Reads a ``.safetensors`` file or a ``torch.save`` file with ``weights_only=True`` onto the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that ``weights_only`` loading refuses (pickled code), with torch's reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} does not load with weights_only=True: {first}") from err


def find_state_dict(checkpoint: Any, *, key: str | Sequence[str] | None = None) -> tuple[dict, tuple[str, ...]]:
    """The state dict inside a checkpoint, and the keys followed to reach it.

    With ``key=None``, follows :data:`CONTAINER_KEYS` (``{"model": sd, ...}``, ``{"state_dict": sd}``) while
    one of them holds a mapping; a mapping without any is the state dict. ``key`` names the path explicitly
    (``"ema"`` or ``("model", "ema")``).

    Args:
        checkpoint: what :func:`read_checkpoint` returned, or a state dict.
        key: the container key or key path, or ``None`` to search.

    Returns:
        ``(state_dict, path)``.

    Raises:
        TypeError: a checkpoint that is not a mapping.
        KeyError: an explicit ``key`` that is not there (the available keys are listed).
        ValueError: no tensors where the state dict should be.

    Example:
        >>> import torch
        >>> sd, path = find_state_dict({"model": {"w": torch.zeros(1)}, "step": 3})
        >>> list(sd), path
        (['w'], ('model',))
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"a checkpoint must be a mapping (a state dict or a dict holding one); got {type(checkpoint).__name__}"
        )
    path: list[str] = []
    sd: Mapping = checkpoint
    if key is not None:
        for k in [key] if isinstance(key, str) else list(key):
            if not isinstance(sd, Mapping) or k not in sd:
                have = sorted(map(str, sd)) if isinstance(sd, Mapping) else type(sd).__name__
                raise KeyError(f"checkpoint has no key {k!r} at {path or 'the top level'}; it has {have}")
            sd = sd[k]
            path.append(k)
    else:
        while True:
            inner = next((c for c in CONTAINER_KEYS if isinstance(sd.get(c), Mapping) and sd.get(c)), None)
            if inner is None:
                break
            sd = sd[inner]
            path.append(inner)
    if not isinstance(sd, Mapping) or not any(isinstance(v, Tensor) for v in sd.values()):
        top = sorted(map(str, sd)) if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(
            f"no tensors in checkpoint{path and f'[{path}]' or ''}: keys {top[:20]}; pass key= to pick the state dict"
        )
    return dict(sd), tuple(path)


def strip_prefixes(
    state_dict: Mapping[str, Any], model_keys: set[str], *, prefixes: Sequence[str] = WRAPPER_PREFIXES
) -> tuple[dict, tuple[str, ...]]:
    """Strips wrapper prefixes from checkpoint keys while that makes more of them model keys.

    Greedy: at each round, the prefix whose removal (from the keys that carry it) matches the most model keys
    is stripped, if it matches more than before, or as many and every key carries it (a uniform wrapper).
    A removal that would make two keys collide is never taken. A model whose own keys start with ``model.``
    keeps them: stripping would match fewer.

    Returns:
        ``(state_dict with renamed keys, the prefixes stripped in order)``.

    Example:
        >>> sd, p = strip_prefixes({"module._orig_mod.fc.weight": 0}, {"fc.weight"})
        >>> list(sd), p
        (['fc.weight'], ('module.', '_orig_mod.'))
    """
    sd = dict(state_dict)
    stripped: list[str] = []
    score = len(sd.keys() & model_keys)
    for _ in range(16):  # nesting deeper than that is not a wrapper
        best = None
        for p in prefixes:
            carriers = [k for k in sd if k.startswith(p)]
            if not carriers:
                continue
            cand = {(k.removeprefix(p)): v for k, v in sd.items()}
            if len(cand) != len(sd):  # a collision
                continue
            s = len(cand.keys() & model_keys)
            if s > score or (s == score and len(carriers) == len(sd)):
                if best is None or s > best[0]:
                    best = (s, p, cand)
        if best is None:
            break
        score, p, sd = best
        stripped.append(p)
    return sd, tuple(stripped)


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    key: str | Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
    skip_mismatched: bool = False,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    prefixes: Sequence[str] = WRAPPER_PREFIXES,
) -> WeightsReport:
    r"""Loads a checkpoint into ``model`` in place: container found, wrapper prefixes stripped, every key checked.

    The state dict is found with :func:`find_state_dict` (a plain state dict, a recipe checkpoint
    ``{"model": ...}``, ``{"state_dict": ...}``), its keys renamed by :func:`strip_prefixes` (``module.``,
    ``_orig_mod.``, ``inner.``, ``model.``, ...), entries matching an ``ignore`` pattern dropped, then
    ``filter_fn(state_dict, model)`` applied (e.g. timm's ``checkpoint_filter_fn`` that resamples a ViT's
    position embeddings). Nothing is written into the model unless every check passes.

    Files are read with ``torch.load(..., weights_only=True)`` (or safetensors): no pickled code runs.

    Args:
        model: the module to load into (a recipe's ``Normalized`` wrapper: pass ``wrapper.inner`` or the wrapper).
        source: a file path (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``) or an in-memory checkpoint.
        strict: raise when a model key is missing or a checkpoint key is unexpected.
        key: the container key (path) of the state dict; ``None`` searches :data:`CONTAINER_KEYS`.
        ignore: ``fnmatch`` patterns of checkpoint keys (after prefix stripping) to drop, e.g. ``("logit_scale",)``
            or ``("head.*",)`` to keep the model's own head.
        allow_missing: ``fnmatch`` patterns of model keys that may be missing under ``strict`` (they keep their
            own values and are still reported in ``missing``), e.g. ``("head.*",)`` for a new head or
            ``("patch_embed.proj.*",)`` for a ConvStem on patch-stem weights.
        skip_mismatched: drop tensors whose shape differs from the model's (reported in ``mismatched``; those
            model tensors keep their values and count as ``missing``). Without it a shape mismatch raises.
        filter_fn: ``(state_dict, model) -> state_dict``, applied after prefix stripping and ``ignore``.
        prefixes: the wrapper prefixes :func:`strip_prefixes` may strip.

    Returns:
        A :class:`WeightsReport`.

    Raises:
        WeightsMismatchError (a ``ValueError``): shape mismatches (without ``skip_mismatched``), or missing /
            unexpected keys under ``strict``; the one-line message names every such key, ``.report`` holds them.
        FileNotFoundError, ValueError, KeyError, TypeError: see :func:`read_checkpoint` and :func:`find_state_dict`.

    Side effects:
        Copies the checkpoint's tensors into ``model``'s parameters and buffers (``load_state_dict``).

    Example:
        >>> import torch
        >>> src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> r = load_weights(dst, {"model": {f"module.{k}": v for k, v in src.state_dict().items()}})
        >>> r.prefixes, r.container, torch.equal(dst.weight, src.weight)
        (('module.',), ('model',), True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    sha = None
    where = "the state dict"
    if isinstance(source, (str, Path)):
        where = f"checkpoint {str(source)!r}"
        sha = file_sha256(source) if Path(source).is_file() else None
        source = read_checkpoint(source)
    sd, container = find_state_dict(source, key=key)
    own = model.state_dict()
    sd, stripped = strip_prefixes(sd, set(own), prefixes=prefixes)
    ignored = sorted(
        k for k, v in sd.items() if not isinstance(v, Tensor) or any(fnmatch.fnmatchcase(k, pat) for pat in ignore)
    )
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}
    if filter_fn is not None:
        sd = dict(filter_fn(sd, model))
    mismatched = tuple(
        sorted(
            (k, tuple(v.shape), tuple(own[k].shape))
            for k, v in sd.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        )
    )
    if skip_mismatched:
        sd = {k: v for k, v in sd.items() if k not in {m[0] for m in mismatched}}
    missing = tuple(sorted(k for k in own if k not in sd))
    unexpected = tuple(sorted(k for k in sd if k not in own))
    loaded = tuple(sorted(k for k in sd if k in own and tuple(sd[k].shape) == tuple(own[k].shape)))
    report = WeightsReport(loaded, missing, unexpected, mismatched, tuple(ignored), stripped, container, sha)
    not_allowed = [k for k in missing if not any(fnmatch.fnmatchcase(k, pat) for pat in allow_missing)]
    if (mismatched and not skip_mismatched) or (strict and (not_allowed or unexpected)):
        raise WeightsMismatchError(f"{where} does not match {type(model).__name__}: {report.summary()}", report)
    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return report

"""The evaluation command's models: timm (pretrained or a checkpoint), open_clip zero-shot, or a Python factory.

Each comes back as one float32 module mapping pixels in [0, 1] to logits (normalization inside), with its
preprocessing (input size, crop_pct, interpolation, mean, std) and a record of where its weights came from.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: pixels in [0, 1] in, the model's normalized input out."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0; got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Preprocess(NamedTuple):
    """How images reach the model: resize the shorter side to ``floor(size / crop_pct)``, center-crop ``size``."""

    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where these came from, e.g. "timm pretrained_cfg (test size)"


class BuiltModel(NamedTuple):
    model: nn.Module  # [0, 1] pixels -> (B, K) logits, float32, eval mode
    preprocess: Preprocess
    info: dict  # JSON-ready: kind, name, weights, digests


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (sorted keys, dtypes, shapes, bytes): names the weights whatever file held them."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _parse_spec(spec: str) -> tuple[str, str]:
    if spec.startswith("open_clip:"):
        return "open_clip", spec[len("open_clip:") :]
    if spec.startswith("timm:"):
        return "timm", spec[len("timm:") :]
    if ":" in spec:
        return "python", spec
    return "timm", spec


def build_model(
    spec: str,
    *,
    pretrained: str | bool | None,
    checkpoint: str | None,
    checkpoint_key: str | None,
    random_init: bool,
    num_classes: int | None,
    kwargs: dict[str, Any],
    class_names: Sequence[str] | None,
    templates: Sequence[Any] | None,
    use_test_size: bool = True,
) -> BuiltModel:
    """Builds the classifier the command evaluates, before any data is read.

    ``spec``: a timm name (``resnet50.a1_in1k``, optionally ``timm:``-prefixed), ``open_clip:<name>`` (an
    open_clip model name, or a path to a model-config JSON registered with ``open_clip.add_model_config``), or a
    Python factory ``package.module:function`` returning an ``nn.Module`` that takes pixels in [0, 1] (unless
    ``mean`` / ``std`` are given) and returns logits.

    Exactly one weight source: ``pretrained`` (timm: ``True``; open_clip: a tag or a file), ``checkpoint``
    (loaded with :func:`advtrain.models.load_weights`, strict) or ``random_init`` (tests only).

    Raises:
        ValueError: no or several weight sources, a checkpoint that does not match (every key named), an
            open_clip model without class names, a factory that is not found or returns no module.
    """
    from advtrain.models import file_sha256, load_weights

    kind, name = _parse_spec(spec)
    sources = [
        s
        for s, on in (
            ("--pretrained", bool(pretrained)),
            ("--checkpoint", checkpoint is not None),
            ("--random-init", random_init),
        )
        if on
    ]
    if len(sources) != 1:
        raise ValueError(
            f"give exactly one of --pretrained, --checkpoint, --random-init for the weights; got {sources or 'none'}"
        )
    info: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "pretrained": pretrained or None,
        "checkpoint": checkpoint,
        "checkpoint_key": checkpoint_key,
        "random_init": random_init,
        "kwargs": kwargs,
    }
    if kind == "open_clip":
        model, pre, extra = _open_clip(
            name,
            pretrained=pretrained,
            checkpoint=checkpoint,
            class_names=class_names,
            templates=templates,
            kwargs=kwargs,
        )
        info |= extra
    else:
        if kind == "timm":
            import timm

            if num_classes is not None:
                kwargs = {"num_classes": num_classes} | kwargs
            try:
                inner = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
            except RuntimeError as err:
                raise ValueError(f"timm cannot build {name!r}: {str(err).splitlines()[0]}") from None
            cfg = timm.data.resolve_data_config(model=inner, use_test_size=use_test_size)
            pre = Preprocess(
                int(cfg["input_size"][-1]),
                float(cfg["crop_pct"]),
                str(cfg["interpolation"]),
                tuple(cfg["mean"]),
                tuple(cfg["std"]),
                f"timm pretrained_cfg of {name} ({'test' if use_test_size else 'train'} size)",
            )
            info["pretrained_cfg"] = {
                k: inner.pretrained_cfg.get(k)
                for k in ("architecture", "tag", "hf_hub_id", "url")
                if k in inner.pretrained_cfg
            }
        else:
            inner = _factory(name, kwargs)
            pcfg = getattr(inner, "pretrained_cfg", None)
            if pcfg:
                import timm

                cfg = timm.data.resolve_data_config(model=inner, use_test_size=use_test_size)
                pre = Preprocess(
                    int(cfg["input_size"][-1]),
                    float(cfg["crop_pct"]),
                    str(cfg["interpolation"]),
                    tuple(cfg["mean"]),
                    tuple(cfg["std"]),
                    f"pretrained_cfg of {name}",
                )
            else:
                pre = Preprocess(0, 0.875, "bicubic", (), (), f"{name} has no pretrained_cfg: give --img-size")
        if checkpoint is not None:
            report = load_weights(inner, checkpoint, strict=True, key=checkpoint_key)
            info["checkpoint_sha256"] = report.sha256
            info["load"] = {
                "loaded": len(report.loaded),
                "prefixes_stripped": list(report.prefixes),
                "container": list(report.container),
                "ignored": list(report.ignored),
            }
        model = inner
    info["weights_sha256"] = state_dict_sha256(model)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if kind == "open_clip" and pretrained and not str(pretrained).startswith(("hf-hub:",)):
        from pathlib import Path

        if Path(str(pretrained)).is_file():
            info["checkpoint_sha256"] = file_sha256(str(pretrained))
    return BuiltModel(model.float().eval(), pre, info)


def _factory(spec: str, kwargs: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model factory {spec!r} not found: {err}") from None
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _open_clip(name, *, pretrained, checkpoint, class_names, templates, kwargs):
    import open_clip

    from advtrain.losses import FrozenTextTower, ZeroShotHead, text_classifier

    if checkpoint is not None:
        raise ValueError(
            "open_clip models take their weights through --pretrained TAG_OR_FILE (open_clip converts "
            "its checkpoints), not --checkpoint"
        )
    if not class_names:
        raise ValueError(
            "an open_clip model needs class names for its zero-shot classifier (--class-names, or a "
            "manifest with class_names, or ImageNet wnid folders)"
        )
    extra = {}
    if name.endswith(".json"):
        from pathlib import Path

        path = Path(name)
        if not path.is_file():
            raise ValueError(f"open_clip model config {name!r} does not exist")
        open_clip.add_model_config(path)
        extra["config"] = path.read_text()
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model {name!r} (open_clip.list_models())")
    tag = pretrained if isinstance(pretrained, str) else None
    if pretrained is True:
        raise ValueError(
            "--pretrained for an open_clip model needs a tag or a file, e.g. --pretrained laion2b_s34b_b79k"
        )
    clip = open_clip.create_model(name, pretrained=tag, force_custom_text=True, **kwargs)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg.get("size", clip.visual.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(
            f"open_clip model {name!r} uses resize_mode={cfg.get('resize_mode')!r}; only 'shortest' "
            "(resize + center crop) is supported"
        )
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    pre = Preprocess(
        size,
        1.0,
        str(cfg.get("interpolation", "bicubic")),
        mean,
        std,
        f"open_clip preprocess_cfg of {name} (resize shorter side to {size}, center crop)",
    )
    tower = FrozenTextTower(clip.text, open_clip.get_tokenizer(name), name=f"{name}:{tag or 'random'}")
    with torch.no_grad():
        w = text_classifier(tower, list(class_names), templates=list(templates))
    head = ZeroShotHead(w, logit_scale=clip.logit_scale.detach())
    model = nn.Sequential()
    model.add_module("visual", clip.visual)
    model.add_module("head", head)
    extra |= {
        "open_clip_name": name,
        "class_names": list(class_names),
        "templates": [t if isinstance(t, str) else t("{}") for t in templates],
        "logit_scale": float(clip.logit_scale.detach()),
    }
    return model, pre, extra


def with_normalization(model: nn.Module, pre: Preprocess) -> nn.Module:
    """``nn.Sequential(Normalize(mean, std), model)``; the model itself when there is no normalization."""
    if not pre.mean:
        return model
    return nn.Sequential(Normalize(pre.mean, pre.std), model).float().eval()

"""AdvXL recipe configuration: frozen dataclasses, named presets, dotted command-line overrides.

Stages are values (``dataclasses.replace``), not flags: a run is a tuple of :class:`Stage` s trained in order,
each with its own resolution, token reducer, attack and sample budget. Schedules count samples seen.

The paper's ImageNet-1K ViT-B/16 baseline (Wang et al., CVPR 2024, arXiv 2401.04727, Table 2):
256M samples at 112 px with PGD-1, then 38.4M samples at 224 px with PGD-3, l_inf eps 4/255, step 4/255.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from advtrain.data import AugmentConfig, DataConfig
from advtrain.eval import IMAGENET_EPS
from advtrain.training import RunConfig, choose, from_dict, override  # noqa: F401  (the config API)
from advtrain.training import load_config as _load_config
from advtrain.training import validators as v

Reducer = Literal["none", "resize", "random_mask", "block_mask"]
DataKind = Literal["digits", "folder", "wds", "tensors"]


@dataclass(frozen=True, kw_only=True)
class Attack:
    """The training attack (PGD-K under ``norm``; ``steps=0`` is standard training)."""

    kind: Literal["pgd", "apgd"] = "pgd"  # apgd: Auto-PGD (no step size; step_size is ignored)
    norm: Literal["linf", "l2", "l1"] = "linf"
    eps: float = 4 / 255  # radius, pixels in [0, 1]
    step_size: float = 4 / 255  # per-step length, same units
    steps: int = 1  # PGD iterations; 0 = no attack (standard training)
    random_start: bool = True

    def __post_init__(self):
        v.eps_for_norm(self.eps, norm=self.norm, key="eps", allow_zero=True)  # 0 with steps=0: standard training
        v.eps_for_norm(self.step_size, norm=self.norm, key="step_size")
        v.check(self.steps >= 0, key="steps", value=self.steps, allowed="an int >= 0 (0: no attack)")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage: its input size, token reducer, attack and sample budget."""

    name: str
    samples: int  # training samples seen in this stage
    img_size: int  # px; the model's input size in this stage (resize reducer) or the full size (masks)
    reducer: Reducer = "none"  # resize: images are resized to img_size; masks keep keep_ratio of the tokens
    keep_ratio: float = 1.0  # for random_mask / block_mask
    attack: Attack = field(default_factory=Attack)
    warmup_samples: int = 0  # linear lr warmup at the start of the stage
    lr: float | None = None  # peak lr of the stage (default: optim.lr)
    eps_warmup_samples: int = 0  # linear eps ramp from 0 at the start of the stage (training from scratch)

    def __post_init__(self):
        v.non_empty(self.name, key="name")
        v.check(self.samples >= 1, key="samples", value=self.samples, allowed="an int >= 1")
        v.check(self.img_size >= 1, key="img_size", value=self.img_size, allowed="an int >= 1 (px)")
        v.positive(self.lr, key="lr", optional=True)
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"stage {self.name!r}: keep_ratio must be in (0, 1]; got {self.keep_ratio}")
        if self.reducer in ("random_mask", "block_mask") and self.keep_ratio == 1:
            raise ValueError(f"stage {self.name!r}: a {self.reducer} stage needs keep_ratio < 1")
        if self.warmup_samples < 0 or self.warmup_samples > self.samples:
            raise ValueError(f"stage {self.name!r}: warmup_samples must be in [0, samples]")
        if self.eps_warmup_samples < 0 or self.eps_warmup_samples > self.samples:
            raise ValueError(f"stage {self.name!r}: eps_warmup_samples must be in [0, samples]")


@dataclass(frozen=True, kw_only=True)
class Model:
    name: str = "vit_base_patch16_224"  # any timm ViT (tiny to giant) or ConvNeXt
    num_classes: int = 1000
    drop_path: float = 0.1
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. embed_dim for tiny ViTs)
    init: str | None = None  # clean-pretrained start: a local state_dict file, or "timm:<name.tag>" (internet)
    init_exclude: tuple[str, ...] = ()  # fnmatch patterns of keys not taken from model.init: checkpoint entries
    #                                     dropped, those model keys keep their init (e.g. "head.*" for a new head)
    init_strict: bool = True  # any other missing / unexpected key fails the run (every key is reported either way)
    stem: Literal["patch", "conv"] = "patch"  # conv: Singh et al.'s ConvStem (advtrain.models.convstem_)
    stem_channels: tuple[int, ...] | None = None  # ConvStem widths (default: advtrain's per-model choice)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalization lives inside the model
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        v.non_empty(self.name, key="name")
        v.check(self.num_classes >= 1, key="num_classes", value=self.num_classes, allowed="an int >= 1")
        v.in_range(self.drop_path, 0, 1, key="drop_path", hi_open=True)
        if self.stem_channels is not None:
            v.check(
                len(self.stem_channels) > 0,
                key="stem_channels",
                value=self.stem_channels,
                allowed="null or a non-empty list of widths",
            )
            v.each(self.stem_channels, v.positive, key="stem_channels")
        v.each(self.mean, v.in_range, key="mean", lo=0, hi=1)
        v.each(self.std, v.positive, key="std")
        if "patch_size" in self.kwargs:
            v.check(
                isinstance(self.kwargs["patch_size"], int) and self.kwargs["patch_size"] >= 1,
                key="kwargs.patch_size",
                value=self.kwargs["patch_size"],
                allowed="an int >= 1",
            )


@dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 1e-3  # peak AdamW learning rate for batch_size (scale it yourself for other batches)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 1.0  # max gradient norm
    ema_decay: float | None = None  # e.g. 0.9999; None: no EMA

    def __post_init__(self):
        v.positive(self.lr, key="lr")
        v.in_range(self.min_lr, 0, self.lr, key="min_lr")
        v.non_negative(self.weight_decay, key="weight_decay")
        v.each(self.betas, v.in_range, key="betas", lo=0, hi=1, hi_open=True)
        v.positive(self.clip_grad, key="clip_grad", optional=True)
        v.in_range(self.ema_decay, 0, 1, key="ema_decay", lo_open=True, hi_open=True, optional=True)


@dataclass(frozen=True, kw_only=True)
class Augment(AugmentConfig):  # + crop_ratio, interpolation, hflip (advtrain.data.AugmentConfig)
    randaugment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment config string; None: off
    mixup: float = 0.8  # MixUp alpha; 0: off
    cutmix: float = 1.0  # CutMix alpha; 0: off
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area fractions of the original image


@dataclass(frozen=True, kw_only=True)
class Data(DataConfig):  # path, val_path, splits, batch_size, num_workers, ... (advtrain.data.DataConfig)
    kind: DataKind = "folder"  # digits: scikit-learn's bundled digits; folder: ImageNet-style class folders;
    #                            wds: WebDataset shards (image + cls, or image + txt in CLIP-text mode)


@dataclass(frozen=True, kw_only=True)
class ClipText:
    """CLIP-text mode: contrast image features with a frozen text tower's caption features (AdvXL Sec. 3.3)."""

    tower: str = "ViT-H-14-CLIPA"  # open_clip model name
    pretrained: str | None = "datacomp1b"  # open_clip pretrained tag; None: random init (tests)
    templates: tuple[str, ...] = ("a photo of a {}.",)  # for the zero-shot evaluation classifier

    def __post_init__(self):
        v.non_empty(self.tower, key="tower")
        v.check(len(self.templates) > 0, key="templates", value=self.templates, allowed="a non-empty list")
        for i, t in enumerate(self.templates):
            v.check("{}" in t, key=f"templates.{i}", value=t, allowed="a template with a {} for the class name")


@dataclass(frozen=True, kw_only=True)
class Eval:
    eps: float = 4 / 255
    pgd_steps: int = 20
    pgd_step_size: float = 1 / 255
    autoattack_samples: int = 0  # 0: no AutoAttack; else a fixed subset of this many validation samples
    img_size: int | None = None  # evaluation resolution (default: the last stage's)
    resolutions: tuple[int, ...] = ()  # after training: clean/PGD accuracy at each of these test-time sizes
    norms: tuple[str, ...] = ("linf",)  # threat models to evaluate, of linf/l2/l1 (the first keeps the short keys)
    l2_eps: float = IMAGENET_EPS["l2"]  # l_2 radius, pixels in [0, 1] (eps is the l_inf one)
    l1_eps: float = IMAGENET_EPS["l1"]  # l_1 radius

    def __post_init__(self):
        v.eps_for_norm(self.eps, norm="linf", key="eps", allow_zero=True)  # the evaluation attack is l_inf PGD
        v.check(self.pgd_steps >= 0, key="pgd_steps", value=self.pgd_steps, allowed="an int >= 0 (0: clean only)")
        if self.pgd_steps:
            v.eps_for_norm(self.pgd_step_size, norm="linf", key="pgd_step_size")
            v.check(self.eps > 0, key="eps", value=self.eps, allowed="> 0 when eval.pgd_steps > 0")
        v.check(
            self.autoattack_samples >= 0,
            key="autoattack_samples",
            value=self.autoattack_samples,
            allowed="an int >= 0 (0: no AutoAttack)",
        )
        if self.autoattack_samples:
            v.check(self.eps > 0, key="eps", value=self.eps, allowed="> 0 for AutoAttack")
        v.check(
            self.img_size is None or self.img_size >= 1,
            key="img_size",
            value=self.img_size,
            allowed="null (the last stage's) or an int >= 1 (px)",
        )
        v.each(self.resolutions, v.positive, key="resolutions")


@dataclass(frozen=True, kw_only=True)
class Finetune:
    """Phase 2 of a two-phase job (AdvXL Table 4, e.g. DataComp-1B + ImageNet-1K): supervised adversarial fine-tuning.

    Phase 1 is the rest of the config (typically CLIP-text mode on image-text shards); phase 2 trains the same
    architecture (``model`` less its class count) on labelled data, starting from phase 1's final checkpoint (its
    image tower; a fresh head for ``num_classes``), with the same ``run`` settings. See :func:`phases`.
    """

    num_classes: int  # classes of the labelled data: the head is new
    data: Data  # labelled data (class folders, or image + cls shards)
    stages: tuple[Stage, ...]
    optim: Optim = field(default_factory=Optim)
    augment: Augment = field(default_factory=Augment)
    eval: Eval = field(default_factory=Eval)
    drop_path: float | None = None  # None: phase 1's model.drop_path

    def __post_init__(self):
        v.check(self.num_classes >= 1, key="num_classes", value=self.num_classes, allowed="an int >= 1")
        v.check(len(self.stages) > 0, key="stages", value=self.stages, allowed="at least one Stage")
        v.in_range(self.drop_path, 0, 1, key="drop_path", hi_open=True, optional=True)


@dataclass(frozen=True, kw_only=True)
class Run(RunConfig):
    """The run section (advtrain.training.RunConfig: out_dir, seed, precision, checkpoints, logging, sinks)."""

    out_dir: str = "runs/advxl"
    compile: bool = False  # torch.compile the model (and a detach_params view of it for the attack)
    compare_standard: bool = False  # also train the same model with no attack and report both
    compare_one_stage: bool = False  # also train one stage at the last stage's size and attack, same samples seen


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    augment: Augment = field(default_factory=Augment)
    data: Data = field(default_factory=Data)
    stages: tuple[Stage, ...] = ()
    eval: Eval = field(default_factory=Eval)
    run: Run = field(default_factory=Run)
    clip_text: ClipText | None = None
    finetune: Finetune | None = None  # a two-phase job: this config, then supervised fine-tuning (phases())

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages is empty: give at least one Stage")
        sizes = [s.img_size for s in self.stages]
        if sizes != sorted(sizes):
            raise ValueError(f"stages must go from coarse to fine (non-decreasing img_size); got {sizes}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique; got {names}")
        v.check_data_counts(self.data)
        p = patch_size(self)
        if p:
            why = f"the patch size {{}} of {self.model.name}"
            for i, s in enumerate(self.stages):
                v.divisible(s.img_size, p, key=f"stages.{i}.img_size", what=why)
            if self.eval.img_size:
                v.divisible(self.eval.img_size, p, key="eval.img_size", what=why)
            for i, r in enumerate(self.eval.resolutions):
                v.divisible(r, p, key=f"eval.resolutions.{i}", what=why)
        for i, s in enumerate(self.stages):
            if s.attack.steps and s.attack.eps == 0:
                raise v.FieldError(
                    f"stages.{i}.attack.eps", "0 with attack.steps > 0; set steps=0 for standard training, or eps > 0"
                )
        a = self.augment
        if self.clip_text is not None and (a.mixup or a.cutmix):
            raise v.FieldError(
                "augment.mixup",
                f"{a.mixup} (augment.cutmix {a.cutmix}) with clip_text: MixUp/CutMix would mix the images but not "
                "their captions; set augment.mixup=0 augment.cutmix=0",
            )
        if self.finetune is not None:
            for key in ("compare_standard", "compare_one_stage"):
                if getattr(self.run, key):
                    raise v.FieldError(f"run.{key}", "true with finetune (a two-phase job) is not supported")
            try:
                phases(self)
            except ValueError as err:
                raise v.FieldError("finetune", f"phase 2 is not a valid config: {err}") from None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------------ (de)serialization


def load_config(path: str | Path) -> TrainConfig:
    """A config saved as JSON (a run directory's ``config.json``); ``override`` applies ``dotted.key=value`` items."""
    return _load_config(TrainConfig, path)


def phases(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The runs of a two-phase job, in order: ``{"pretrain": ..., "finetune": ...}`` (``{"run": cfg}`` without one).

    ``pretrain`` is ``cfg`` without ``finetune``, in ``run.out_dir/pretrain``. ``finetune`` is the same model
    (``model`` with ``finetune.num_classes``) trained on ``finetune``'s data, stages, optimizer, augmentation and
    evaluation, without CLIP-text mode, in ``run.out_dir/finetune``, with ``model.init`` the pre-training run's
    final checkpoint: ``checkpoints/ckpt-<S>.pt``, ``S`` the samples seen at its end (its total rounded up to whole
    batches), and ``head.*`` added to ``model.init_exclude``: ``train.load_init_weights`` loads the image tower and
    leaves out the head (a projection into the text space; timm's classifier of ViTs), so the class head starts fresh.
    """
    ft = cfg.finetune
    if ft is None:
        return {"run": cfg}
    root = Path(cfg.run.out_dir)
    pre = dataclasses.replace(cfg, finetune=None, run=dataclasses.replace(cfg.run, out_dir=str(root / "pretrain")))
    seen = -(-pre.total_samples // pre.data.batch_size) * pre.data.batch_size  # the loop takes whole batches
    model = dataclasses.replace(
        cfg.model,
        num_classes=ft.num_classes,
        init=str(root / "pretrain" / "checkpoints" / f"ckpt-{seen:012d}.pt"),
        init_exclude=(*cfg.model.init_exclude, "head.*"),
        drop_path=cfg.model.drop_path if ft.drop_path is None else ft.drop_path,
    )
    tuned = TrainConfig(
        model=model,
        optim=ft.optim,
        augment=ft.augment,
        data=ft.data,
        stages=ft.stages,
        eval=ft.eval,
        run=dataclasses.replace(cfg.run, out_dir=str(root / "finetune")),
    )
    return {"pretrain": pre, "finetune": tuned}


def preset(name: str) -> TrainConfig:
    """A fresh copy of the named preset (``PRESETS``, below)."""
    return choose(PRESETS, name)()


# ------------------------------------------------------------------------------------------------ presets


def two_stage(
    *,
    coarse_samples: int,
    fine_samples: int,
    coarse_size: int,
    fine_size: int,
    warmup: int = 0,
    reducer: Reducer = "resize",
    keep_ratio: float = 1.0,
) -> tuple[Stage, ...]:
    """AdvXL's coarse-to-fine schedule: PGD-1 on reduced inputs, then PGD-3 at full size (step 4/255)."""
    return (
        Stage(
            name="coarse",
            samples=coarse_samples,
            img_size=coarse_size,
            reducer=reducer,
            keep_ratio=keep_ratio,
            attack=Attack(steps=1, step_size=4 / 255),
            warmup_samples=warmup,
        ),
        Stage(
            name="fine",
            samples=fine_samples,
            img_size=fine_size,
            attack=Attack(steps=3, step_size=4 / 255),
            warmup_samples=min(warmup, fine_samples) // 4,
        ),
    )


def embedded() -> TrainConfig:
    """The README's main job: a small ViT on scikit-learn's bundled digits, coarse 16 px then fine 32 px.

    No download. The 8x8 digits are upsampled to 32 px (patch 4: 64 tokens); the coarse stage resizes to 16 px
    (16 tokens, 25%, as AdvXL's 224 -> 112) for 85% of the samples (AdvXL: 256M of 294.4M). eps 0.1 (l_inf,
    pixels in [0, 1]), ramped up over the first 24,000 samples: a ViT adversarially trained from scratch at full
    eps stays at chance here, and with a 12,000-sample ramp the one-stage run stayed near chance (28% clean).
    Every stage is evaluated at 32 px (at 16 px the same eps is a weaker attack). The launcher also trains
    one-stage 32 px PGD-3 for the same samples (``run.compare_one_stage``, same ramp) and the same model without
    attacks (``run.compare_standard``), and prints the three side by side. Two intra-op threads: the three runs
    took 220 s and 304 s on a 2-core machine shared with other jobs (recipes/advxl/README.md).
    """
    eps = 0.1
    return TrainConfig(
        model=Model(
            name="vit_tiny_patch16_224",
            num_classes=10,
            drop_path=0.0,
            kwargs=dict(
                patch_size=4,
                embed_dim=64,
                depth=4,
                num_heads=4,
                mlp_ratio=2.0,
                img_size=32,
                global_pool="avg",
                class_token=False,
            ),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        optim=Optim(lr=3e-3, min_lr=1e-5, weight_decay=0.05, clip_grad=1.0, ema_decay=None),
        augment=Augment(
            randaugment=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0, crop_scale=(0.7, 1.0), hflip=False
        ),
        data=Data(kind="digits", crop_pct=1.0, batch_size=64, num_workers=0),
        stages=(
            Stage(
                name="coarse",
                samples=36_000,
                img_size=16,
                reducer="resize",
                attack=Attack(eps=eps, step_size=eps, steps=1),
                warmup_samples=2_000,
                eps_warmup_samples=24_000,
            ),
            Stage(
                name="fine",
                samples=6_400,
                img_size=32,
                lr=1e-3,
                attack=Attack(eps=eps, step_size=eps / 2, steps=3),
                warmup_samples=500,
            ),
        ),
        eval=Eval(eps=eps, pgd_steps=20, pgd_step_size=eps / 8, img_size=32),
        run=Run(
            out_dir="runs/advxl-embedded",
            precision="fp32",
            checkpoint_every=10_000,
            log_every=50,
            compare_standard=True,
            compare_one_stage=True,
            threads=2,
        ),
    )


def imagenette224(path: str = "../shared/datasets/imagenette224") -> TrainConfig:
    """ViT-S/16 on Imagenette (10 ImageNet classes, 224 px WebDataset shards), 112 px PGD-1 then 224 px PGD-3."""
    return TrainConfig(
        model=Model(name="vit_small_patch16_224", num_classes=10, drop_path=0.1),
        optim=Optim(lr=1e-3, weight_decay=0.05, ema_decay=None),
        augment=Augment(randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
        data=Data(
            kind="wds", path=path, train_split="train", val_split="val", batch_size=128, num_workers=8, in_memory=True
        ),
        stages=two_stage(coarse_samples=240_000, fine_samples=36_000, coarse_size=112, fine_size=224, warmup=15_000),
        run=Run(out_dir="runs/advxl-imagenette", checkpoint_every=60_000),
    )


def cifar10(path: str = "../shared/datasets/cifar10") -> TrainConfig:
    """ViT-Ti/4 on CIFAR-10 shards at 32 px, 16 px PGD-1 then 32 px PGD-3, eps 8/255 (CIFAR convention)."""
    eps = 8 / 255
    return TrainConfig(
        model=Model(
            name="vit_tiny_patch16_224",
            num_classes=10,
            drop_path=0.1,
            kwargs=dict(patch_size=4, img_size=32),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2471, 0.2435, 0.2616),
        ),
        optim=Optim(lr=1e-3, weight_decay=0.05),
        augment=Augment(randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, crop_scale=(0.6, 1.0)),
        data=Data(
            kind="wds",
            path=path,
            train_split="train",
            val_split="test",
            crop_pct=1.0,
            batch_size=256,
            num_workers=8,
            in_memory=True,
        ),
        stages=(
            Stage(
                name="coarse",
                samples=2_000_000,
                img_size=16,
                reducer="resize",
                attack=Attack(eps=eps, step_size=eps, steps=1),
                warmup_samples=100_000,
            ),
            Stage(name="fine", samples=500_000, img_size=32, attack=Attack(eps=eps, step_size=eps / 2, steps=3)),
        ),
        eval=Eval(eps=eps, pgd_steps=20, pgd_step_size=2 / 255),
        run=Run(out_dir="runs/advxl-cifar10", checkpoint_every=250_000),
    )


def imagenet_vit_b16(path: str = "/datasets/imagenet") -> TrainConfig:
    """The paper's ImageNet-1K ViT-B/16 row (Table 2): 256M samples at 112 px + 38.4M at 224 px, batch 4096."""
    return TrainConfig(
        model=Model(name="vit_base_patch16_224", num_classes=1000, drop_path=0.1, kwargs=dict(global_pool="avg")),
        # MAE's from-scratch ViT recipe (He et al. 2022, Table 11), which AdvXL Sec. 4.1 says it closely follows:
        # lr 1e-4 x batch / 256 at batch 4096, weight decay 0.3, betas (0.9, 0.95), EMA 0.9999
        optim=Optim(lr=1.6e-3, weight_decay=0.3, betas=(0.9, 0.95), clip_grad=1.0, ema_decay=0.9999),
        augment=Augment(crop_scale=(0.08, 1.0)),
        data=Data(kind="folder", path=path, batch_size=4096, num_workers=10, val_samples=None),
        stages=two_stage(
            coarse_samples=256_000_000, fine_samples=38_400_000, coarse_size=112, fine_size=224, warmup=20 * 1_281_167
        ),
        eval=Eval(autoattack_samples=5000),
        run=Run(out_dir="runs/advxl-imagenet-vit-b16", checkpoint_every=5_000_000),
    )


def imagenet_vit_l16(path: str = "/datasets/imagenet") -> TrainConfig:
    """The paper's ImageNet-1K ViT-L/16 row (Table 2): the ViT-B/16 schedule with a larger model."""
    base = imagenet_vit_b16(path)
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name="vit_large_patch16_224", drop_path=0.2),
        run=dataclasses.replace(base.run, out_dir="runs/advxl-imagenet-vit-l16"),
    )


def _advxl_h_g(name: str, *, activation_checkpointing: bool, out_dir: str, path: str) -> TrainConfig:
    """The H/14 and g/14 rows of the authors' release table: 5.12B samples at 84 px, 38.4M at 224, 6.4M at 336.

    Read in the README of github.com/UCSC-VLAA/AdvXL ("Model Weights": Sample@Resolution
    ``5.12B@84 + 38.4M@224 + 6.4M@336``, Adv. Steps ``2/3``, dataset "DataComp-1B + ImageNet-1K") and its eval
    scripts (timm ``vit_huge_patch14_224`` / ``vit_giant_patch14_224``, ``--gp avg``, ImageNet mean/std, 336 px).
    The paper's own tables were not read (recipes/advxl/README.md marks every value it could not check). One data
    source per run: every stage trains on ImageNet-1K here (see the README for the DataComp-1B pre-training).
    FSDP by default (recipes/advxl/README.md, memory table). Optimizer, augmentation and regularization as
    imagenet_vit_b16/_l16: MAE's from-scratch recipe (He et al. 2022, Table 11), drop path 0.2 as MAE's ViT-L/H.
    """
    b16 = imagenet_vit_b16(path)
    return TrainConfig(
        model=Model(name=name, num_classes=1000, drop_path=0.2, kwargs={"global_pool": "avg"}),
        optim=b16.optim,
        augment=b16.augment,
        data=Data(kind="folder", path=path, batch_size=4096, num_workers=10, val_samples=None),
        stages=(
            Stage(
                name="coarse",
                samples=5_120_000_000,
                img_size=84,
                reducer="resize",
                attack=Attack(steps=2, step_size=4 / 255),
                warmup_samples=20 * 1_281_167,
            ),
            Stage(name="fine", samples=38_400_000, img_size=224, attack=Attack(steps=3, step_size=4 / 255)),
            Stage(name="fine336", samples=6_400_000, img_size=336, attack=Attack(steps=3, step_size=4 / 255)),
        ),
        eval=Eval(autoattack_samples=5000, img_size=336),
        run=Run(
            out_dir=out_dir,
            checkpoint_every=5_000_000,
            parallel="fsdp",
            activation_checkpointing=activation_checkpointing,
        ),
    )


def imagenet_vit_h14(path: str = "/datasets/imagenet") -> TrainConfig:
    """AdvXL ViT-H/14 (authors' release: 5.12B@84 PGD-2, 38.4M@224 + 6.4M@336 PGD-3); FSDP, no checkpointing."""
    return _advxl_h_g(
        "vit_huge_patch14_224", activation_checkpointing=False, out_dir="runs/advxl-imagenet-vit-h14", path=path
    )


def imagenet_vit_g14(path: str = "/datasets/imagenet") -> TrainConfig:
    """AdvXL ViT-g/14 (authors' release: as ViT-H/14); FSDP with activation checkpointing."""
    return _advxl_h_g(
        "vit_giant_patch14_224", activation_checkpointing=True, out_dir="runs/advxl-imagenet-vit-g14", path=path
    )


def imagenet_vit_s_convstem(path: str = "/datasets/imagenet") -> TrainConfig:
    """Singh, Croce & Hein (NeurIPS 2023, arXiv 2303.01870): ViT-S + ConvStem, APGD-2 adversarial training.

    l_inf eps 4/255 with 2-step APGD from the clean point (their ``apgd_train``: no random start), heavy
    augmentation (RandAugment, MixUp, CutMix, label smoothing, random erasing 0.25, crop scale (0.08, 1),
    bicubic), EMA, no drop path, no gradient clipping, 300 epochs at 224 px. The paper starts from a clean-trained
    ViT-S + ConvStem (their own checkpoint, released by download link, not on the timm hub: pass it as
    ``model.init=/path/clean.pt init_exclude=[]``). timm has no ConvStem ViT-S, so the preset names timm's
    ImageNet-1k ViT-S (``augreg_in1k``; the authors' code loads ``vit_small_patch16_224`` from timm when
    ``model.pretrained=1``) for every tensor but the patch stem, which ConvStem replaces (``init_exclude``).
    """
    epoch = 1_281_167
    return TrainConfig(
        model=Model(
            name="vit_small_patch16_224",
            num_classes=1000,
            drop_path=0.0,
            stem="conv",
            init="timm:vit_small_patch16_224.augreg_in1k",
            init_exclude=("patch_embed.proj.*",),
        ),
        optim=Optim(lr=1e-3, weight_decay=0.05, clip_grad=None, ema_decay=0.9999),
        augment=Augment(
            randaugment="rand-m9-mstd0.5-inc1",
            mixup=0.8,
            cutmix=1.0,
            label_smoothing=0.1,
            crop_scale=(0.08, 1.0),
            interpolation="bicubic",
            random_erasing=0.25,
        ),
        data=Data(kind="folder", path=path, batch_size=1024, num_workers=10),
        stages=(
            Stage(
                name="apgd2",
                samples=300 * epoch,
                img_size=224,
                attack=Attack(kind="apgd", eps=4 / 255, steps=2, random_start=False),
                warmup_samples=20 * epoch,
            ),
        ),
        eval=Eval(autoattack_samples=5000, resolutions=(224, 288, 320, 384)),
        run=Run(out_dir="runs/singh-vit-s-convstem", checkpoint_every=5_000_000),
    )


def imagenette224_two_phase(path: str = "../shared/datasets/imagenette224") -> TrainConfig:
    """Two phases (AdvXL's web data + ImageNet-1K recipe, Table 4, at Imagenette scale): ViT-S/16 pre-trained
    adversarially against the frozen CLIPA ViT-H/14 text tower's features of the shards' captions (112 px, PGD-1),
    then fine-tuned on the same shards' labels (224 px, PGD-3, fresh head). imagenette224's schedule, split in two.

    Needs the CLIPA weights (``open_clip``, the Hugging Face hub) and the ``transformers`` package (its tokenizer).
    """
    coarse, fine = two_stage(coarse_samples=240_000, fine_samples=36_000, coarse_size=112, fine_size=224, warmup=15_000)
    data = Data(
        kind="wds", path=path, train_split="train", val_split="val", batch_size=128, num_workers=8, in_memory=True
    )
    return TrainConfig(
        model=Model(name="vit_small_patch16_224", num_classes=1024, drop_path=0.1),  # 1024: the text width
        optim=Optim(lr=1e-3, weight_decay=0.05, ema_decay=None),
        augment=Augment(randaugment="rand-m9-mstd0.5-inc1", mixup=0.0, cutmix=0.0),
        data=data,
        stages=(coarse,),
        clip_text=ClipText(tower="ViT-H-14-CLIPA", pretrained="datacomp1b"),
        finetune=Finetune(
            num_classes=10,
            data=data,
            stages=(fine,),
            optim=Optim(lr=1e-3, weight_decay=0.05, ema_decay=None),
            augment=Augment(randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
        ),
        run=Run(out_dir="runs/advxl-imagenette-two-phase", checkpoint_every=60_000),
    )


def imagenette224_two_phase_tiny(path: str = "../shared/datasets/imagenette224") -> TrainConfig:
    """:func:`imagenette224_two_phase` on a CPU in minutes: a 2-block, 32-wide random-init ViT (patch 8) and a tiny
    random-init open_clip text tower (advtrain.losses.tiny_text_tower, no download); 32 px PGD-1 on the captions,
    then 64 px PGD-2 on the labels. It shows the plumbing, not AdvXL's numbers."""
    eps = 4 / 255
    data = Data(
        kind="wds",
        path=path,
        train_split="train",
        val_split="val",
        batch_size=32,
        num_workers=0,
        in_memory=False,  # streamed: the run reads a part of the shards, decoding only what it uses
        val_samples=160,
    )
    augment = Augment(randaugment=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0, crop_scale=(0.35, 1.0))
    evaluate = Eval(eps=eps, pgd_steps=5, pgd_step_size=1 / 255)
    return TrainConfig(
        model=Model(
            name="vit_tiny_patch16_224",
            num_classes=32,  # the tiny text tower's width
            drop_path=0.0,
            kwargs=dict(
                patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=64, global_pool="avg", class_token=False
            ),
        ),
        optim=Optim(lr=2e-3, min_lr=1e-5, weight_decay=0.05, clip_grad=1.0),
        augment=augment,
        data=data,
        stages=(
            Stage(
                name="coarse",
                samples=6_000,
                img_size=32,
                reducer="resize",
                attack=Attack(eps=eps, step_size=eps, steps=1),
                warmup_samples=128,
            ),
        ),
        eval=evaluate,
        clip_text=ClipText(tower="tiny", pretrained=None, templates=("a photo of a {}.",)),
        finetune=Finetune(
            num_classes=10,
            data=data,
            stages=(
                Stage(
                    name="fine",
                    samples=3_000,
                    img_size=64,
                    attack=Attack(eps=eps, step_size=eps / 2, steps=2),
                    warmup_samples=64,
                ),
            ),
            optim=Optim(lr=1e-3, min_lr=1e-5, weight_decay=0.05, clip_grad=1.0),
            augment=augment,
            eval=evaluate,
        ),
        run=Run(
            out_dir="runs/advxl-two-phase-tiny", precision="fp32", checkpoint_every=100_000, log_every=8, threads=1
        ),
    )


PRESETS = {
    f.__name__: f
    for f in (
        embedded,
        imagenette224,
        cifar10,
        imagenet_vit_b16,
        imagenet_vit_l16,
        imagenet_vit_h14,
        imagenet_vit_g14,
        imagenet_vit_s_convstem,
        imagenette224_two_phase,
        imagenette224_two_phase_tiny,
    )
}


def patch_size(cfg: TrainConfig) -> int | None:
    """The ViT patch size from the model kwargs or the timm name (``..._patch16_...``); None for non-ViTs."""
    if "patch_size" in cfg.model.kwargs:
        return int(cfg.model.kwargs["patch_size"])
    name = cfg.model.name
    if "patch" in name:
        digits = "".join(c for c in name.split("patch", 1)[1] if c.isdigit() or c == "_").split("_")[0]
        return int(digits) if digits else None
    return None


def check_consistency(cfg: TrainConfig) -> None:
    """Cheap checks that need no model or data (the rest happen in ``train.validate``)."""
    for s in cfg.stages:
        if s.attack.steps and s.attack.eps == 0:
            raise ValueError(f"stage {s.name!r} attacks with eps 0; set steps=0 for standard training")
    if math.isnan(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0; got {cfg.optim.lr}")
    if cfg.clip_text and cfg.data.kind == "folder":
        raise ValueError("CLIP-text mode needs captions: use image + caption WebDataset shards (data.kind='wds')")
    if cfg.clip_text and cfg.run.parallel == "fsdp":  # fully_shard refuses the scalar temperature logit_scale
        raise ValueError("CLIP-text mode needs run.parallel=ddp (its scalar logit_scale cannot be FSDP-sharded)")

"""Fast AdvProp recipe configuration: frozen dataclasses, named presets, dotted command-line overrides.

One config value picks the method (``method``): ``"fast_advprop"`` (Mei et al., ICLR 2022, arXiv 2204.09838),
``"vanilla"`` (clean training) or ``"advprop"`` (Xie et al., CVPR 2020, arXiv 1911.09665: every image paired with
its PGD-K adversarial twin). All three train for the same compute budget: ``optim.epochs`` is the *vanilla*
budget in epochs, and a method whose epoch costs ``c`` times a vanilla epoch runs ``optim.epochs / c`` epochs,
its learning-rate milestones divided by the same ``c`` (:func:`cost_per_epoch`, :func:`run_epochs`).

The paper's ImageNet ResNet-50 setting (its training script ``scripts/run_fastadvprop.sh``): SGD, momentum 0.9,
lr 0.1 for 256 clean images, weight decay 1e-4, 105 vanilla epochs with the lr divided by 10 at epochs 30, 60, 90
and 100; Fast AdvProp with 20% of each batch attacked (256 clean + 64 attacked = 320 images a step), PGD-1,
eps 1/255, step 1/255, random start, beta 0.5; hence 105 / 1.2 = 87.5 epochs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from advtrain.data import AugmentConfig, DataConfig
from advtrain.training import RunConfig, choose, from_dict, override  # noqa: F401  (the config API)
from advtrain.training import load_config as _load_config
from advtrain.training import validators as v

Method = Literal["fast_advprop", "vanilla", "advprop"]
DataKind = Literal["digits", "folder", "wds"]

# ImageNet-C's 15 corruption types (Hendrycks & Dietterich, arXiv 1903.12261), as the imagecorruptions library
# names them; its 4 extra "validation" corruptions (speckle_noise, gaussian_blur, spatter, saturate) may be listed too.
COMMON_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# Cheap on CPU: no glass_blur (a per-pixel shuffle loop), zoom_blur (up to 30 zooms) or elastic_transform.
CHEAP_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)


@dataclass(frozen=True, kw_only=True)
class Model:
    name: str = "resnet50"  # any timm model with plain BatchNorm layers (ResNets, EfficientNets, RegNets, ...)
    num_classes: int = 1000
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. channels for tiny ResNets)
    cifar_stem: bool = False  # 32 px inputs: a 3x3 stride-1 first convolution and no max-pool (CIFAR ResNets)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalization lives inside the model
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        v.non_empty(self.name, key="name")
        v.check(self.num_classes >= 1, key="num_classes", value=self.num_classes, allowed="an int >= 1")
        v.each(self.mean, v.in_range, key="mean", lo=0, hi=1)
        v.each(self.std, v.positive, key="std")


@dataclass(frozen=True, kw_only=True)
class Adv:
    """The adversarial part of each step; which fields matter depends on ``TrainConfig.method``."""

    p_adv: float = 0.2  # fast_advprop: fraction of each batch that is attacked, in (0, 1]
    eps: float = 1 / 255  # l_inf radius, pixels in [0, 1]
    step_size: float = 1 / 255  # per PGD step, same units
    steps: int = 1  # fast_advprop: PGD-K, every step a recycled (trained-on) pass
    advprop_steps: int = 5  # advprop: PGD-K of the paired baseline (5: Xie et al.'s default; 1: the cheap one)
    advprop_targeted: bool = True  # advprop: PGD towards a random other class (Xie et al.); false: untargeted
    #                                (fast_advprop always attacks untargeted, its Sec. 3.2.2 change)
    beta: float = 0.5  # fast_advprop: loss weight of each noisy / intermediate pass and of the adversarial pass
    random_start: bool = True  # start PGD uniformly inside the eps-ball (fast_advprop: the "noisy images")
    shuffle_bn: bool = True  # fast_advprop: re-deal attacked rows over BN groups before the adversarial pass
    bn_groups: int = 1  # BatchNorm groups per process (ghost BN): the per-device BN of a G-device run
    sync_update_speed: bool = True  # divide each parameter group's gradient by the samples that reached it

    def __post_init__(self):
        v.in_range(self.p_adv, 0, 1, key="p_adv", lo_open=True)
        v.eps_for_norm(self.eps, norm="linf", key="eps")
        v.eps_for_norm(self.step_size, norm="linf", key="step_size")
        v.check(self.steps >= 1, key="steps", value=self.steps, allowed="an int >= 1")
        v.check(self.advprop_steps >= 1, key="advprop_steps", value=self.advprop_steps, allowed="an int >= 1")
        v.positive(self.beta, key="beta")
        v.check(self.bn_groups >= 1, key="bn_groups", value=self.bn_groups, allowed="an int >= 1")


@dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 0.1  # SGD lr for the batch (the paper: 0.1 for 256 clean images; scale it yourself)
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on every parameter, as the paper's torchvision-style recipe
    nesterov: bool = False
    epochs: float = 105  # the VANILLA budget in epochs; a method costing c vanilla epochs per epoch runs epochs / c
    milestones: tuple[float, ...] = (30, 60, 90, 100)  # vanilla epochs where lr *= gamma (divided by c too)
    gamma: float = 0.1
    warmup_epochs: float = 0  # linear warmup from 0 (vanilla epochs; divided by c too)
    calibrate: bool = True  # false: every method runs optim.epochs (same epochs, not the same cost)

    def __post_init__(self):
        v.positive(self.lr, key="lr")
        v.non_negative(self.weight_decay, key="weight_decay")
        v.positive(self.epochs, key="epochs")
        if not self.epochs > 0:
            raise ValueError(f"optim.epochs must be > 0; got {self.epochs}")
        if list(self.milestones) != sorted(self.milestones) or any(not 0 < m < self.epochs for m in self.milestones):
            raise ValueError(f"optim.milestones must increase inside (0, {self.epochs}); got {self.milestones}")
        v.in_range(self.gamma, 0, 1, key="gamma", lo_open=True)
        v.in_range(self.warmup_epochs, 0, self.epochs, key="warmup_epochs", hi_open=True)
        v.in_range(self.momentum, 0, 1, key="momentum", hi_open=True)


@dataclass(frozen=True, kw_only=True)
class Augment(AugmentConfig):  # + crop_scale, crop_ratio, interpolation, hflip (advtrain.data.AugmentConfig)
    mixup: float = 0.0  # MixUp alpha on the clean images only; 0: off
    cutmix: float = 0.0  # CutMix alpha on the clean images only; 0: off
    label_smoothing: float = 0.0  # every pass's training loss


@dataclass(frozen=True, kw_only=True)
class Data(DataConfig):  # path, val_path, splits, batch_size, num_workers, ... (advtrain.data.DataConfig)
    kind: DataKind = "folder"  # digits: scikit-learn's bundled digits; folder: ImageNet-style class folders;
    #                            wds: WebDataset shards (image + cls)
    img_size: int = 224  # px, training and evaluation
    train_size: int | None = None  # images per epoch (default: the dataset's length or its manifest count)


@dataclass(frozen=True, kw_only=True)
class Eval:
    eps: float = 1 / 255  # PGD robust accuracy, l_inf
    pgd_steps: int = 10
    pgd_step_size: float = 0.25 / 255
    corruptions: tuple[str, ...] = COMMON_CORRUPTIONS  # imagecorruptions names; (): no corruption evaluation
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_samples: int | None = None  # a fixed seeded subset of the validation set; None: all of it
    evals: int = 1  # clean + PGD evaluations spread evenly over training (the last at the end; corruptions then)
    autoattack_samples: int = 0  # 0: no AutoAttack; else l_inf AutoAttack on a seeded class-stratified subset
    # Folders of the official sets (read at the end, with the model's classes as wnids: advtrain.eval.shift_eval)
    imagenet_c: str | None = None  # ImageNet-C release: <root>/<corruption>/<severity>/<wnid>/*.JPEG; None: the
    #                                corruptions are regenerated on the fly on corruption_samples validation images
    imagenet_r: str | None = None  # ImageNet-R: <root>/<wnid>/*.jpg (200 classes; logits restricted to them)
    stylized: str | None = None  # Stylized-ImageNet: <root>/<wnid>/* (the ImageNet val layout, 1000 classes)
    folder_samples: int | None = None  # a seeded subset of each folder (each ImageNet-C pair); None: all images

    def __post_init__(self):
        if any(s not in (1, 2, 3, 4, 5) for s in self.severities) or (self.corruptions and not self.severities):
            raise ValueError(f"eval.severities must be a non-empty subset of 1..5; got {self.severities}")
        v.check(self.evals >= 1, key="evals", value=self.evals, allowed="an int >= 1")
        v.check(self.pgd_steps >= 0, key="pgd_steps", value=self.pgd_steps, allowed="an int >= 0 (0: clean only)")
        v.eps_for_norm(self.eps, norm="linf", key="eps", allow_zero=True)  # the evaluation attack is l_inf PGD
        if self.pgd_steps:
            v.eps_for_norm(self.pgd_step_size, norm="linf", key="pgd_step_size")
            v.check(self.eps > 0, key="eps", value=self.eps, allowed="> 0 when eval.pgd_steps > 0")
        v.check(
            self.corruption_samples is None or self.corruption_samples >= 1,
            key="corruption_samples",
            value=self.corruption_samples,
            allowed="null (all) or an int >= 1",
        )
        v.check(
            self.folder_samples is None or self.folder_samples >= 1,
            key="folder_samples",
            value=self.folder_samples,
            allowed="null (all) or an int >= 1",
        )
        if self.imagenet_c and not self.corruptions:
            raise v.FieldError("imagenet_c", f"{self.imagenet_c!r} is set but eval.corruptions is empty")
        if len(set(self.corruptions)) != len(self.corruptions):
            raise v.FieldError("corruptions", f"{list(self.corruptions)} lists a corruption twice")


@dataclass(frozen=True, kw_only=True)
class Run(RunConfig):
    """The run section (advtrain.training.RunConfig: out_dir, seed, precision, checkpoints, logging, sinks)."""

    out_dir: str = "runs/fast_advprop"
    compare: bool = False  # launch: also train vanilla, AdvProp PGD-5 and AdvProp PGD-1 at the same budget


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    method: Method = "fast_advprop"
    model: Model = field(default_factory=Model)
    adv: Adv = field(default_factory=Adv)
    optim: Optim = field(default_factory=Optim)
    augment: Augment = field(default_factory=Augment)
    data: Data = field(default_factory=Data)
    eval: Eval = field(default_factory=Eval)
    run: Run = field(default_factory=Run)

    def __post_init__(self):
        if self.method not in typing.get_args(Method):
            raise ValueError(f"method must be one of {typing.get_args(Method)}; got {self.method!r}")
        v.check_data_counts(self.data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------------ the budget


def cost_per_epoch(cfg: TrainConfig) -> float:
    r"""Forward/backward passes per training image, relative to vanilla training (1 pass per image).

    .. math::
        c_{vanilla} = 1,\qquad c_{fast} = (1 - p) + p\,(K + 1) = 1 + p K,\qquad c_{advprop} = K + 2.

    Fast AdvProp: the clean share takes one pass; the attacked share takes K recycled passes (the first on the
    noisy images; each one trains the weights and yields the next PGD step's input gradient) and one on the
    adversarial images. AdvProp: K attack passes, then a clean and an adversarial training pass for every image
    (K = 5: the 7x of the paper's introduction).

    Example:
        >>> cost_per_epoch(preset("imagenet_resnet50"))
        1.2
        >>> cost_per_epoch(dataclasses.replace(preset("imagenet_resnet50"), method="advprop"))
        7.0
    """
    match cfg.method:
        case "vanilla":
            return 1.0
        case "fast_advprop":
            return round(1.0 + cfg.adv.p_adv * cfg.adv.steps, 12)
        case "advprop":
            return float(cfg.adv.advprop_steps + 2)
    raise ValueError(f"unknown method {cfg.method!r}")


def run_epochs(cfg: TrainConfig) -> float:
    """The epochs this run trains: the vanilla budget divided by :func:`cost_per_epoch` (when calibrated).

    Example:
        >>> round(run_epochs(preset("imagenet_resnet50")), 9)
        87.5
    """
    return cfg.optim.epochs / cost_per_epoch(cfg) if cfg.optim.calibrate else cfg.optim.epochs


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Step schedule at (fractional) epoch ``epoch`` of this run: warmup, then lr * gamma^(milestones passed).

    Milestones and warmup are in vanilla epochs and shrink with the run (:func:`run_epochs`), as the paper's
    ``exact_same_training_budget`` does (which also rounds them to whole epochs: 88 for 87.5).
    """
    o = cfg.optim
    scale = run_epochs(cfg) / o.epochs
    if epoch < o.warmup_epochs * scale:
        return o.lr * (epoch + 1e-12) / (o.warmup_epochs * scale)
    return o.lr * o.gamma ** sum(epoch >= m * scale for m in o.milestones)


def split_counts(cfg: TrainConfig, batch: int) -> tuple[int, int]:
    """(clean rows, attacked rows) of a batch of ``batch`` images: fast_advprop attacks the last p_adv of them.

    Example:
        >>> split_counts(preset("imagenet_resnet50"), 320)
        (256, 64)
    """
    match cfg.method:
        case "fast_advprop":
            n_adv = round(cfg.adv.p_adv * batch)
            return batch - n_adv, n_adv
        case "vanilla":
            return batch, 0
        case "advprop":
            return batch, batch  # paired: every image and its adversarial twin
    raise ValueError(f"unknown method {cfg.method!r}")


# ------------------------------------------------------------------------------------------------ (de)serialization


def load_config(path: str | Path) -> TrainConfig:
    """A config saved as JSON (a run directory's ``config.json``); ``override`` applies ``dotted.key=value`` items."""
    return _load_config(TrainConfig, path)


def preset(name: str) -> TrainConfig:
    """A fresh copy of the named preset (``PRESETS``, below)."""
    return choose(PRESETS, name)()


# ------------------------------------------------------------------------------------------------ presets


def embedded() -> TrainConfig:
    """The README's main job: a narrow ResNet-10 on scikit-learn's bundled digits at 32 px, on one CPU thread.

    No download. 80 images a step (Fast AdvProp: 64 clean + 16 attacked), BatchNorm in 2 groups (2 emulated
    devices, so shuffle-BN has something to shuffle), a 28-vanilla-epoch budget with the paper's step schedule
    shape (lr / 10 at 30, 60, 90 and 100 of 105 epochs, scaled). Training eps 2/255; the PGD-10 evaluation uses
    8/255, where the methods differ (at 2/255 they all stay near their clean accuracy on digits). The launcher
    also trains vanilla, AdvProp PGD-5 and AdvProp PGD-1 at the same budget and prints the table.
    """
    eps = 2 / 255
    return TrainConfig(
        method="fast_advprop",
        model=Model(
            name="resnet10t",
            num_classes=10,
            kwargs=dict(channels=[16, 32, 64, 128], stem_width=16),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        adv=Adv(p_adv=0.2, eps=eps, step_size=eps, steps=1, advprop_steps=5, beta=0.5, bn_groups=2),
        optim=Optim(lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=28, milestones=(8, 16, 24, 26), gamma=0.1),
        augment=Augment(crop_scale=(0.7, 1.0), hflip=False),
        data=Data(kind="digits", img_size=32, crop_pct=1.0, batch_size=80, num_workers=0),
        eval=Eval(
            eps=8 / 255,
            pgd_steps=10,
            pgd_step_size=2 / 255,
            corruptions=CHEAP_CORRUPTIONS,
            severities=(1, 2, 3, 4, 5),
            corruption_samples=150,
            evals=2,
        ),
        run=Run(
            out_dir="runs/fast_advprop-embedded",
            precision="fp32",
            checkpoint_every=20_000,
            log_every=10,
            compare=True,
            threads=1,
        ),
    )


def imagenette224(path: str = "../shared/datasets/imagenette224") -> TrainConfig:
    """ResNet-50 on Imagenette (10 ImageNet classes, 224 px WebDataset shards), the paper's recipe at batch 160.

    160 images a step = 128 clean + 32 attacked, lr 0.05 (0.1 x 128 / 256), BatchNorm in 2 groups of 64 clean /
    16 attacked images (the paper's per-GPU batch on 4 GPUs).
    """
    return TrainConfig(
        model=Model(name="resnet50", num_classes=10),
        adv=Adv(p_adv=0.2, bn_groups=2),
        optim=Optim(lr=0.05),
        data=Data(
            kind="wds",
            path=path,
            train_split="train",
            val_split="val",
            img_size=224,
            batch_size=160,
            num_workers=8,
            in_memory=True,
        ),
        eval=Eval(corruption_samples=500),
        run=Run(out_dir="runs/fast_advprop-imagenette", checkpoint_every=100_000),
    )


def cifar10(path: str = "../shared/datasets/cifar10") -> TrainConfig:
    """CIFAR ResNet-18 (3x3 stem, no max-pool) on CIFAR-10 shards at 32 px, the paper's schedule shape.

    160 images a step = 128 clean + 32 attacked, lr 0.1, weight decay 5e-4 (the CIFAR convention), eps 1/255.
    The corruptions are ImageNet-C's severities applied at 32 px (CIFAR-10-C tuned its own constants).
    """
    return TrainConfig(
        model=Model(
            name="resnet18",
            num_classes=10,
            cifar_stem=True,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2471, 0.2435, 0.2616),
        ),
        adv=Adv(p_adv=0.2, bn_groups=2),
        optim=Optim(lr=0.1, weight_decay=5e-4),
        augment=Augment(crop_scale=(0.35, 1.0)),
        data=Data(
            kind="wds",
            path=path,
            train_split="train",
            val_split="test",
            img_size=32,
            crop_pct=1.0,
            batch_size=160,
            num_workers=8,
            in_memory=True,
        ),
        eval=Eval(corruption_samples=2000),
        run=Run(out_dir="runs/fast_advprop-cifar10", checkpoint_every=1_000_000),
    )


def imagenet_resnet50(path: str = "/datasets/imagenet") -> TrainConfig:
    """The paper's ImageNet-1K ResNet-50 row: 320 images a step (256 clean + 64 PGD-1), 105 / 1.2 epochs.

    BatchNorm in 4 groups (80 = 64 clean + 16 attacked images each) reproduces the per-GPU BN of the authors'
    4-GPU DataParallel run in one process; under ``torchrun --nproc-per-node 4`` set ``adv.bn_groups=1`` (each
    rank is then one BN group, and shuffle-BN exchanges rows across ranks). The corruption evaluation uses a
    fixed 5,000-image subset of the validation set (all 50,000 x 75 corruptions take days of CPU time).
    """
    return TrainConfig(
        # the authors' imagenet.py: Normalize(0.5, 0.5), RandomSizedCrop(224) and Scale(256) (bilinear)
        model=Model(name="resnet50", num_classes=1000, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        adv=Adv(p_adv=0.2, eps=1 / 255, step_size=1 / 255, steps=1, beta=0.5, bn_groups=4),
        optim=Optim(lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=105, milestones=(30, 60, 90, 100)),
        augment=Augment(crop_scale=(0.08, 1.0), hflip=True, interpolation="bilinear"),
        data=Data(kind="folder", path=path, img_size=224, batch_size=320, num_workers=10),
        eval=Eval(corruption_samples=5000),
        run=Run(out_dir="runs/fast_advprop-imagenet-resnet50", checkpoint_every=5_000_000),
    )


PRESETS = {f.__name__: f for f in (embedded, imagenette224, cifar10, imagenet_resnet50)}


def check_consistency(cfg: TrainConfig, world: int = 1) -> None:
    """Cheap checks that need no model or data (the rest happen in ``train.validate``)."""
    b = cfg.data.batch_size
    if b % world:
        raise ValueError(f"data.batch_size {b} is not divisible by the world size {world}")
    per_rank = b // world
    if cfg.method == "fast_advprop" and abs(cfg.adv.p_adv * per_rank - round(cfg.adv.p_adv * per_rank)) > 1e-6:
        raise ValueError(f"adv.p_adv * batch per rank = {cfg.adv.p_adv} * {per_rank} must be a whole number of images")
    n_clean, n_adv = split_counts(cfg, per_rank)
    g = cfg.adv.bn_groups
    if n_clean % g or n_adv % g:
        raise ValueError(f"adv.bn_groups {g} must divide the clean ({n_clean}) and attacked ({n_adv}) rows per rank")
    if (n_clean and n_clean // g < 2) or (n_adv and n_adv // g < 2):
        raise ValueError(f"BatchNorm groups of one image: {n_clean} clean / {n_adv} attacked rows in {g} groups")
    if (cfg.augment.mixup or cfg.augment.cutmix) and n_clean % 2:
        raise ValueError(f"MixUp/CutMix pair images: the clean rows per rank ({n_clean}) must be even")
    if (cfg.augment.mixup or cfg.augment.cutmix) and n_clean == 0:
        raise ValueError("MixUp/CutMix apply to clean images only, and p_adv = 1 leaves none")
    if not 0 <= cfg.augment.label_smoothing < 1:
        raise ValueError(f"augment.label_smoothing must be in [0, 1); got {cfg.augment.label_smoothing}")
    if cfg.eval.corruptions and not cfg.eval.imagenet_c and cfg.data.img_size < 32:
        raise ValueError(f"the corruption library needs images of at least 32 px; data.img_size is {cfg.data.img_size}")

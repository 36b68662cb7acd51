"""Fast AdvProp (Mei et al., ICLR 2022, arXiv 2204.09838) and its baselines at the same budget, one readable file.

A Fast AdvProp step on a batch of B images (Algorithm 1; the authors' ``imagenet.py`` with
``scripts/run_fastadvprop.sh``):

1. the first (1 - p_adv) B images are clean: one forward/backward through the main BatchNorms, loss weight 1
   (MixUp/CutMix, when on, mix these only);
2. the last p_adv B images get a random start delta_0 in the eps-ball: the *noisy* images, one forward/backward
   through the auxiliary BatchNorms (``advtrain.recycle.recycled_step``) that adds beta-weighted weight gradients
   AND returns the input gradient g; delta_1 = Proj(delta_0 + step * sign(g)) is PGD-1 at no extra pass;
3. shuffle-BN: the adversarial rows are re-dealt over the BatchNorm groups (ghost groups in one process,
   ranks under DDP), so each group mixes rows that were attacked in different groups;
4. one forward/backward on the adversarial images through the auxiliary BatchNorms, loss weight beta;
5. update-speed synchronization: the gradients (sums of weighted per-sample losses) are divided per parameter
   group by the weighted samples that reached it (shared: all; main BN: clean; aux BN: noisy + adversarial);
   then SGD with momentum.

Cost: (1 - p) B + p B K + p B = (1 + p K) B image passes, 1.2x vanilla per epoch at p = 0.2, K = 1; the
run trains epochs / 1.2 epochs so that the total equals vanilla training. Baselines: ``vanilla`` (clean images,
main BN) and ``advprop`` (every image attacked with PGD-K towards a random other class through the auxiliary BN
in train mode; clean and adversarial losses weight 1; (K + 2)x per epoch).

Claim (embedded preset: a width-16 ResNet-10-T on scikit-learn's digits, one CPU thread, seed 0, 28 vanilla
epochs of budget, 5.1 min for the four runs on a shared machine, 2026-12-02): Fast AdvProp 99.56% clean, 88.00%
PGD-10 (8/255), 33.61% mean corruption error (regenerated); vanilla 99.33 / 86.00 / 34.08; targeted AdvProp PGD-5
97.33 / 62.44 / 44.09, PGD-1 99.56 / 73.56 / 37.63 (recipes/fast_advprop/README.md). CPU benchmark: a Fast
AdvProp step costs 1.23x a vanilla step (benchmarks/fast_advprop_cpu.py; the paper's accounting: 1.2x).

Run it through ``python -m recipes.fast_advprop.launch``; ``main(cfg)`` is the entry point for one process (DDP
when ``WORLD_SIZE > 1``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from advtrain import pgd, project
from advtrain.attacks import random_targets
from advtrain.bn import (bn_route, convert_split_bn_, exchange_rows, ghost_bn, shuffle_across_ranks,
                         shuffle_permutation)
from advtrain.data import (BadSampleBudget, ShardSource, check_run_sources, epoch_size, eval_subset, make_loader,
                           sources_from_config)
from advtrain.eval import check_shift_sets, corruption_bars, model_classes, recipe_eval, shift_eval, shift_table
from advtrain.losses import cross_entropy
from advtrain.parallel import check_parallel_options
from advtrain.recycle import maybe_no_sync, recycled_step, scale_grads_, sync_update_speed_
from advtrain.training import (Dist, Every, Panel, Progress, RunDir, StepTimer, all_mean, autocast, barrier,
                               check_finite, check_sinks, check_timm_model, cycle, environment_meta, interactive,
                               log_due, make_mixup, open_sinks, plot_metrics, read_metrics,
                               restore_training_state, run_logger, save_checkpoint, seeded_host_rng,
                               setup_distributed, stable_seed, step_generator, take, training_state, wrap_ddp)
from recipes.fast_advprop.config import (TrainConfig, check_consistency, cost_per_epoch, lr_at, run_epochs,
                                         split_counts)


# ================================================================================================ data


def build_sources(cfg: TrainConfig) -> tuple:
    """(train, val) advtrain.data sources: RandomResizedCrop of the original image for training, crop_pct eval."""
    return sources_from_config(cfg.data, cfg.augment, size=cfg.data.img_size, seed=cfg.run.seed,
                               num_classes=cfg.model.num_classes)


# ================================================================================================ model


class Normalized(nn.Module):
    """Pixels in [0, 1] in, normalization inside, so ``eps=1/255`` means one grey level."""

    def __init__(self, inner: nn.Module, mean, std):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def create_model(cfg: TrainConfig) -> nn.Module:
    """The timm model (plain BatchNorms), with the CIFAR stem when asked."""
    import timm

    m = cfg.model
    inner = timm.create_model(m.name, pretrained=False, num_classes=m.num_classes, **m.kwargs)
    if m.cifar_stem:
        conv = getattr(inner, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(inner, "maxpool"):
            raise ValueError(f"model.cifar_stem needs a ResNet with a single conv1 and a maxpool; "
                             f"{m.name} has conv1 = {type(conv).__name__}")
        inner.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        inner.maxpool = nn.Identity()
    return inner


def build_model(cfg: TrainConfig) -> Normalized:
    """The timm model with a main and an auxiliary BatchNorm everywhere (``advtrain.bn.convert_split_bn_``).

    Every method gets the split model, so BN groups and checkpoints look the same; vanilla training only ever
    routes through the main BNs (its auxiliary ones stay untouched and out of the update: no gradient).
    """
    return Normalized(convert_split_bn_(create_model(cfg)), cfg.model.mean, cfg.model.std)


# ================================================================================================ the step


@contextlib.contextmanager
def bn(raw: nn.Module, route: str, groups: int):
    """The BN route (main "clean" or auxiliary "adv") and the BN groups for one pass."""
    with bn_route(raw, route), ghost_bn(raw, groups=groups):
        yield


def training_loss(cfg: TrainConfig):
    """Per-sample cross-entropy; hard labels get the label smoothing, MixUp's soft targets already have it."""
    s = cfg.augment.label_smoothing

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(out, y, label_smoothing=s if y.ndim == 1 else 0.0, reduction="none")

    return loss_fn


def top1(out: Tensor, y: Tensor) -> float:
    """Training top-1 of one pass: argmax against the label (soft targets: against their argmax)."""
    if out.shape[0] == 0:
        return float("nan")
    target = y.argmax(1) if y.ndim == 2 else y
    return float((out.detach().argmax(1) == target).float().mean())


def train_pass(cfg, model, raw, x, y, *, route: str, weight: float, last: bool, dd: Dist) -> tuple[Tensor, float]:
    """One forward/backward adding ``weight * sum_i loss_i`` to ``.grad``; all-reduces only when ``last``.

    Returns the detached per-sample losses and the pass's training top-1 (what the paper's Fig. 2 plots).
    """
    with maybe_no_sync(model, enabled=not last):
        with bn(raw, route, cfg.adv.bn_groups), autocast(cfg.run.precision, dd.device):
            out = model(x)
            loss = training_loss(cfg)(out, y)
        (weight * loss.sum()).backward()
    return loss.detach(), top1(out, y)


def mix(cfg: TrainConfig, mixup, x: Tensor, y: Tensor, step: int, dd: Dist) -> tuple[Tensor, Tensor]:
    """MixUp/CutMix (timm) on clean images, seeded by the step; soft targets."""
    if mixup is None or x.shape[0] == 0:
        return x, y
    with seeded_host_rng(stable_seed(cfg.run.seed, step, dd.rank, "mix")):
        return mixup(x, y)


def random_start(x: Tensor, eps: float, g: torch.Generator) -> Tensor:
    """Noisy images: x + delta_0, delta_0 uniform in the l_inf eps-ball, projected into the pixel box."""
    noise = (torch.rand(x.shape, generator=g, device=g.device, dtype=torch.float32) * 2 - 1) * eps
    return project(x + noise.to(x.device, x.dtype), x, eps=eps, norm="linf")


def shuffle_bn(cfg: TrainConfig, x: Tensor, y: Tensor, g: torch.Generator, dd: Dist) -> tuple[Tensor, Tensor]:
    """Re-deals the adversarial rows so that rows attacked in one BN group are normalized apart (shuffle-BN).

    Across ranks (DDP) every rank's rows are spread over all ranks; in one process with G ghost groups the rows
    of each attack group are dealt round-robin over the G groups. One group and one process: nothing to do.
    """
    if not cfg.adv.shuffle_bn:
        return x, y
    if dd.world > 1:
        x, perm = shuffle_across_ranks(x, generator=g)
        return x, exchange_rows(y, perm)
    groups = cfg.adv.bn_groups
    if groups == 1:
        return x, y
    sources = torch.arange(x.shape[0], device=x.device) // (x.shape[0] // groups)  # the attack's BN group
    perm = shuffle_permutation(sources, groups=groups, generator=g)
    return x[perm], y[perm]


def finish(cfg: TrainConfig, raw: nn.Module, opt, *, n_clean: float, n_aux: float) -> None:
    """Update-speed synchronization (or one common average), then the SGD step."""
    if cfg.adv.sync_update_speed:
        sync_update_speed_(raw, n_clean=n_clean, n_aux=n_aux)
    else:
        scale_grads_(raw, 1.0 / (n_clean + n_aux))
    opt.step()


def vanilla_step(cfg, model, raw, opt, x, y, step, g, mixup, dd) -> dict:
    xc, yc = mix(cfg, mixup, x, y, step, dd)
    loss, acc = train_pass(cfg, model, raw, xc, yc, route="clean", weight=1.0, last=True, dd=dd)
    finish(cfg, raw, opt, n_clean=x.shape[0], n_aux=0.0)
    return {"loss": float(loss.mean()), "loss_clean": float(loss.mean()), "acc_clean": acc}


def fast_advprop_step(cfg, model, raw, opt, x, y, step, g, mixup, dd) -> dict:
    """Clean pass, K recycled passes (noisy images first), shuffle-BN, adversarial pass, synchronized update."""
    a = cfg.adv
    n_clean, n_adv = split_counts(cfg, x.shape[0])
    xa, ya = x[n_clean:], y[n_clean:]
    out, total = {}, 0.0
    if n_clean:
        xc, yc = mix(cfg, mixup, x[:n_clean], y[:n_clean], step, dd)
        loss_c, out["acc_clean"] = train_pass(cfg, model, raw, xc, yc, route="clean", weight=1.0, last=False, dd=dd)
        out["loss_clean"], total = float(loss_c.mean()), float(loss_c.sum())
    x_k = random_start(xa, a.eps, g) if a.random_start else xa
    for k in range(a.steps):  # PGD-K; every step's forward/backward also trains the weights (gradient recycling)
        with maybe_no_sync(model, enabled=True):
            with bn(raw, "adv", a.bn_groups), autocast(cfg.run.precision, dd.device):
                r = recycled_step(model, xa, ya, x_k - xa, beta=a.beta, loss_fn=training_loss(cfg))
        x_k = project(x_k + a.step_size * r.grad.sign(), xa, eps=a.eps, norm="linf")
        total += a.beta * float(r.loss.sum())
        if k == 0:
            out["loss_noisy"], out["acc_noisy"] = float(r.loss.mean()), top1(r.output, ya)
    x_adv, y_adv = shuffle_bn(cfg, x_k, ya, g, dd)
    loss_a, out["acc_adv"] = train_pass(cfg, model, raw, x_adv, y_adv, route="adv", weight=a.beta, last=True, dd=dd)
    out["loss_adv"] = float(loss_a.mean())
    total += a.beta * float(loss_a.sum())
    n_aux = a.beta * a.steps * n_adv + a.beta * n_adv
    finish(cfg, raw, opt, n_clean=float(n_clean), n_aux=n_aux)
    return {"loss": total / (n_clean + n_aux)} | out


def advprop_attack(cfg: TrainConfig, raw: nn.Module, x: Tensor, y: Tensor, g: torch.Generator, dd: Dist) -> Tensor:
    """AdvProp's PGD-K through the auxiliary BN in train mode (batch statistics, as the training pass; pgd restores
    the running statistics it moves), towards a random other class drawn from ``g`` (Xie et al.), or untargeted."""
    a = cfg.adv
    t = random_targets(y, cfg.model.num_classes, generator=g) if a.advprop_targeted else y
    with bn(raw, "adv", a.bn_groups), autocast(cfg.run.precision, dd.device):
        return pgd(raw, x, t, eps=a.eps, step_size=a.step_size, steps=a.advprop_steps, norm="linf",
                   targeted=a.advprop_targeted, random_start=a.random_start, loss_fn=training_loss(cfg), generator=g)


def advprop_step(cfg, model, raw, opt, x, y, step, g, mixup, dd) -> dict:
    """AdvProp: PGD-K on every image (advprop_attack), then a clean pass (main BNs) and an adversarial one (aux)."""
    x_adv = advprop_attack(cfg, raw, x, y, g, dd)
    xc, yc = mix(cfg, mixup, x, y, step, dd)
    loss_c, acc_c = train_pass(cfg, model, raw, xc, yc, route="clean", weight=1.0, last=False, dd=dd)
    loss_a, acc_a = train_pass(cfg, model, raw, x_adv, y, route="adv", weight=1.0, last=True, dd=dd)
    n = x.shape[0]
    finish(cfg, raw, opt, n_clean=float(n), n_aux=float(n))
    return {"loss": float(loss_c.sum() + loss_a.sum()) / (2 * n), "loss_clean": float(loss_c.mean()),
            "loss_adv": float(loss_a.mean()), "acc_clean": acc_c, "acc_adv": acc_a}


def train_step(cfg: TrainConfig, model, raw, opt, batch, step: int, dd: Dist, mixup) -> dict:
    """One optimizer step of ``cfg.method``; returns the step's losses (per-sample means) and per-pass top-1."""
    x = batch[0].to(dd.device, non_blocking=True).float().div_(255)
    y = batch[1].to(dd.device, non_blocking=True)
    g = step_generator(cfg.run.seed, step, dd.rank, device=dd.device)
    opt.zero_grad(set_to_none=True)
    match cfg.method:
        case "vanilla":
            return vanilla_step(cfg, model, raw, opt, x, y, step, g, mixup, dd)
        case "fast_advprop":
            return fast_advprop_step(cfg, model, raw, opt, x, y, step, g, mixup, dd)
        case "advprop":
            return advprop_step(cfg, model, raw, opt, x, y, step, g, mixup, dd)
    raise ValueError(f"unknown method {cfg.method!r}")


# ================================================================================================ evaluation


def run_eval(cfg: TrainConfig, raw: nn.Module, val_ds, dd: Dist, *, corruptions: bool, results) -> dict:
    """Clean top-1, PGD and (optionally) AutoAttack top-1 in float32 (main BNs, eval mode; advtrain.eval.recipe_eval,
    per-sample results in ``results``); with ``corruptions`` the corruption error too."""
    e = cfg.eval

    def batches():  # lazily: ImageNet's validation set does not fit in memory as floats
        loader = make_loader(val_ds, batch_size=cfg.data.batch_size, seed=cfg.run.seed, train=False,
                             num_workers=cfg.data.num_workers)
        for b in take(loader, cfg.data.val_samples):
            yield b[0].to(dd.device).float().div(255), b[1]

    out = recipe_eval(raw, batches, norms=("linf",), eps={"linf": e.eps}, pgd_steps=e.pgd_steps,
                      pgd_step_size=e.pgd_step_size, autoattack_samples=e.autoattack_samples, seed=cfg.run.seed,
                      results=results, progress=interactive(), distributed=False)  # rank 0 only
    if corruptions and (e.corruptions or e.imagenet_r or e.stylized):
        out |= corruption_eval(cfg, raw, val_ds, dd)
    return out


def corruption_eval(cfg: TrainConfig, raw: nn.Module, val_ds, dd: Dist) -> dict:
    """ImageNet-C (the official folders, else regenerated on a fixed validation subset), ImageNet-R and
    Stylized-ImageNet: top-1 errors, mean corruption error and mCE (advtrain.eval.shift_eval)."""
    e, d = cfg.eval, cfg.data
    with autocast(cfg.run.precision, dd.device):
        return shift_eval(raw, classes=model_classes(d, num_classes=cfg.model.num_classes),
                          corruptions=e.corruptions, severities=e.severities, imagenet_c=e.imagenet_c,
                          imagenet_r=e.imagenet_r, stylized=e.stylized, samples=e.folder_samples,
                          fallback=lambda: eval_subset(val_ds, e.corruption_samples, seed=cfg.run.seed),
                          size=d.img_size, crop_pct=d.crop_pct, interpolation=cfg.augment.interpolation,
                          seed=cfg.run.seed, batch_size=d.batch_size, num_workers=d.num_workers, device=dd.device,
                          progress=interactive())


# ================================================================================================ validation


def validate(cfg: TrainConfig) -> None:
    """Every configuration error we can find before training starts, with a message that names it."""
    check_consistency(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_timm_model(cfg.model.name)
    check_sinks(tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb)
    check_parallel_options(cfg.run.parallel, activation_checkpointing=False, split_bn=True,  # every method's model
                           recycling=cfg.method == "fast_advprop", compile=False)
    if cfg.run.activation_checkpointing:  # a recomputed BatchNorm forward would update its running statistics twice
        raise ValueError("run.activation_checkpointing is not supported by Fast AdvProp (BatchNorm recomputation)")
    with torch.device("meta"):  # builds no weights: checks the BatchNorms and the kwargs in well under a second
        try:
            inner = create_model(cfg)
        except TypeError as err:
            raise ValueError(f"timm cannot build {cfg.model.name} with model.kwargs={cfg.model.kwargs}: "
                             f"{err}") from None
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in inner.modules()):
            raise ValueError(f"{cfg.model.name} has no BatchNorm: (Fast) AdvProp needs BatchNorms to split")
        try:
            convert_split_bn_(inner)
        except TypeError as err:
            raise ValueError(f"{cfg.model.name}: {err}") from None
    d = cfg.data
    train, val = build_sources(cfg)
    check_run_sources(train, val, world=int(os.environ.get("WORLD_SIZE", "1")), num_workers=d.num_workers,
                      batch_size=d.batch_size, epoch=d.train_size, val_samples=d.val_samples, need_epoch=True,
                      need_val_samples=True)
    e = cfg.eval
    if isinstance(val, ShardSource) and e.corruptions and not e.imagenet_c and e.corruption_samples is None:
        raise ValueError("streaming validation data needs eval.corruption_samples for the corruptions")
    check_shift_sets(classes=model_classes(d, num_classes=cfg.model.num_classes), corruptions=e.corruptions,
                     severities=e.severities, imagenet_c=e.imagenet_c, imagenet_r=e.imagenet_r, stylized=e.stylized,
                     prefix="eval.")  # the folders (ImageNet-C/-R/Stylized), else the on-the-fly corruptions' library


# ================================================================================================ run directory


def plot(run: RunDir, cfg: TrainConfig, total: int) -> Path | None:
    """metrics.png: training losses, training top-1 of each pass (the paper's Fig. 2: clean / noisy / adversarial,
    averaged between metric lines), clean / PGD top-1 at each evaluation, final corruption errors."""
    skip = "loss_clean" if cfg.method == "vanilla" else None  # vanilla's clean loss is its loss
    losses = tuple(k for k in ("loss", "loss_clean", "loss_noisy", "loss_adv") if k != skip)
    passes = {k: k.removeprefix("acc_") for k in ("acc_clean", "acc_noisy", "acc_adv")}
    panels = [Panel(title=f"{cfg.method}: training losses", ylabel="training loss", keys=losses),
              Panel(title="training top-1 by pass", ylabel="training top-1 (%)", keys=tuple(passes), scale=100,
                    labels=passes),
              Panel(title="evaluation", ylabel="top-1 (%)", kind="eval", scale=100,
                    keys=lambda k: k == "clean" or (k.startswith("pgd") and k[3:].isdigit())),
              Panel(title="corruptions", kind="eval", draw=corruption_bars)]
    return plot_metrics(read_metrics(run.metrics_path), run.path / "metrics.png", panels=panels, total=total)


def results_table(evals: list[dict], cfg: TrainConfig) -> str:
    key = f"pgd{cfg.eval.pgd_steps}"
    lines = [f"method `{cfg.method}`: {run_epochs(cfg):.2f} epochs at {cost_per_epoch(cfg):g}x the cost of a "
             f"vanilla epoch ({cfg.optim.epochs:g} vanilla epochs of budget)", "",
             f"| samples | epochs | clean top-1 (%) | PGD-{cfg.eval.pgd_steps} top-1 (%) | corruption error (%) |",
             "|---|---|---|---|---|"]
    for e in evals:
        ce = f"{100 * e['corruption_error']:.2f}" if "corruption_error" in e else "-"
        pg = f"{100 * e[key]:.2f}" if key in e else "-"
        lines.append(f"| {e['samples']} | {e['epoch']:.2f} | {100 * e['clean']:.2f} | {pg} | {ce} |")
    shift = ("corruption_errors", "imagenet_r_error", "stylized_error")
    last = next((e for e in reversed(evals) if any(k in e for k in shift)), None)
    if last:
        lines += ["", shift_table(last, cfg.eval.severities)]
    return "\n".join(lines) + "\n"


# ================================================================================================ main


def main(cfg: TrainConfig, *, stop_after_samples: int | None = None) -> dict:
    """Trains ``cfg.method`` for its calibrated budget, evaluating ``eval.evals`` times; resumes from the run
    directory's latest checkpoint.

    Args:
        cfg: the resolved configuration.
        stop_after_samples: leave (as if preempted) after the first checkpoint at or beyond this many samples.

    Returns:
        ``{"evals", "run_dir", "finished", "seconds", "train_seconds", "steps", "epochs", "final_weights"}``;
        ``train_seconds`` counts the training steps only (no data wait, no evaluation); both times are summed
        over resumed runs (a finished run re-run reports the times it took).
    """
    validate(cfg)
    dd = setup_distributed(device=cfg.run.device, threads=cfg.run.threads)
    log = run_logger("fast_advprop", dd)
    run = RunDir(cfg.run.out_dir, dd=dd, log=log)
    meta = environment_meta(source=__file__, imagecorruptions=("imagecorruptions-imaug", "imagecorruptions"))
    run.prepare(cfg.to_dict(), meta=meta | {"cost_per_epoch": cost_per_epoch(cfg), "run_epochs": run_epochs(cfg)},
                fresh=cfg.run.fresh)
    torch.manual_seed(cfg.run.seed)
    raw = build_model(cfg).to(dd.device)
    o = cfg.optim
    opt = torch.optim.SGD(raw.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          nesterov=o.nesterov)
    train_ds, val_ds = build_sources(cfg)
    n_train, batch = epoch_size(train_ds, cfg.data.train_size), cfg.data.batch_size
    total = max(1, round(run_epochs(cfg) * n_train / batch))  # optimizer steps
    eval_steps = {max(1, round(total * (i + 1) / cfg.eval.evals)) for i in range(cfg.eval.evals)}
    loader = make_loader(train_ds, batch_size=batch // dd.world, seed=cfg.run.seed, rank=dd.rank, world=dd.world,
                         num_workers=cfg.data.num_workers, pin_memory=dd.device.type == "cuda")
    budget = BadSampleBudget(max_fraction=cfg.data.bad_sample_budget)
    objects = {"model": raw, "optim": opt, "loader": loader, "budget": budget}
    state = run.resume()
    if state is not None:
        restore_training_state(state, objects, dd)
    step, evals = (state["step"], json.loads(state["evals"])) if state else (0, [])
    timer = StepTimer(dd.device, state)

    def checkpoint() -> Path | None:  # every rank: the loader and RNG states are gathered from all of them
        st = training_state(objects, dd, samples_seen=step * batch, step=step, evals=json.dumps(evals), **timer.state())
        return save_checkpoint(run.path, st, keep=cfg.run.keep_checkpoints) if dd.main else None

    if state is None:
        checkpoint()  # step 0: a run preempted before its first checkpoint resumes from here
    # the clean and adversarial passes use different BNs: some parameters sit out each pass
    model = wrap_ddp(raw, dd, find_unused_parameters=True)
    a = cfg.augment
    mixup = make_mixup(mixup=a.mixup, cutmix=a.cutmix, label_smoothing=a.label_smoothing,
                       num_classes=cfg.model.num_classes)
    sinks = open_sinks(run.path, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, config=cfg.to_dict()) \
        if dd.main else ()
    metrics, acc_window = run.metrics(sinks=sinks), {}
    log(f"{cfg.method}: {run_epochs(cfg):.2f} epochs = {total} steps of {batch} images "
        f"(cost {cost_per_epoch(cfg):g}x vanilla per epoch, budget {o.epochs:g} vanilla epochs)")
    bar = Progress(total=total, initial=step, unit="step", desc=cfg.method, dd=dd, every=cfg.run.log_every, log=log)
    batches, ckpt_due, finished = cycle(loader), Every(cfg.run.checkpoint_every, start=step * batch), True
    raw.train()
    while step < total:
        epoch = step * batch / n_train
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        b = timer.next(batches)
        budget.update(b.bad, good=len(b.keys), check=False)
        losses = train_step(cfg, model, raw, opt, b, step, dd, mixup)
        timer.done(batch)
        for k, v in losses.items():  # per-pass training top-1, averaged over the steps between metric lines
            if k.startswith("acc_") and math.isfinite(v):  # NaN: a pass with no rows
                acc_window.setdefault(k, []).append(v)
        check_finite(losses["loss"], step=step, where=cfg.method)
        step += 1
        samples = step * batch
        bar.update(1, loss=losses["loss"], lr=opt.param_groups[0]["lr"])
        if log_due(step, every=cfg.run.log_every, total=total):  # the global batch's values, as one process's
            logged = all_mean(losses | {k: sum(v) / len(v) for k, v in acc_window.items()}, dd)
            acc_window.clear()
            budget.check(across_ranks=dd.world > 1)
            metrics.write({"kind": "train", "samples": samples, "step": step, "epoch": epoch,
                           "lr": opt.param_groups[0]["lr"]} | timer.window() | logged | budget.metrics())
        if step in eval_steps:
            if dd.main:
                r = run_eval(cfg, raw, val_ds, dd, corruptions=step == total,
                             results=run.path / "eval" / f"step{step}.jsonl")
                evals.append(r | {"kind": "eval", "samples": samples, "step": step, "epoch": samples / n_train})
                log(f"eval at step {step}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in r.items()
                                                           if isinstance(v, float)))
                metrics.write(evals[-1])
            barrier(dd)
            raw.train()
        if ckpt_due(samples, force=step == total):
            path = checkpoint()
            if path is not None:
                log(f"checkpoint {path.name}")
            if stop_after_samples is not None and samples >= stop_after_samples and step < total:
                finished = False
                break
    bar.close()
    metrics.close()
    seconds = timer.seconds
    if dd.main and finished:
        plot(run, cfg, total * batch)
        (run.path / "results.md").write_text(results_table(evals, cfg))
        log(f"done in {seconds:.0f} s ({timer.train_seconds:.0f} s training); results in {run.path}")
    barrier(dd)
    return {"evals": evals, "run_dir": str(run.path), "finished": finished, "seconds": seconds,
            "train_seconds": timer.train_seconds, "steps": total, "epochs": run_epochs(cfg),
            "final_weights": {k: v.detach().cpu() for k, v in raw.state_dict().items()}}

"""AdvXL: coarse-to-fine adversarial training (Wang et al., CVPR 2024, arXiv 2401.04727), one readable file.

Stage 1 trains long and cheap on reduced inputs (resize to 112 px, or random / block token masks) with PGD-1;
stage 2 fine-tunes briefly at 224 px with PGD-3 (l_inf, eps 4/255, step 4/255). Schedules count samples seen.
Optional CLIP-text mode contrasts image features with a frozen text tower's caption features (Sec. 3.3).

Claim (embedded preset, 2 CPU cores, seeds 0 and 1): a 4-layer ViT on scikit-learn's digits, 36k samples at 16 px
with PGD-1 then 6.4k at 32 px with PGD-3, comes within 0-9 PGD-20 points of one-stage 32 px PGD-3 training of
the same samples at ~1/4 of its compute, with higher clean accuracy; measured tables in recipes/advxl/README.md.

Run it through ``python -m recipes.advxl.launch``; ``main(cfg)`` is the entry point for one process (DDP when
``WORLD_SIZE > 1``).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from advtrain import pgd
from advtrain.attacks import detach_params
from advtrain.data import BadSampleBudget, check_run_sources, class_names, make_loader, sources_from_config
from advtrain.eval import format_resolution_table, plot_resolution, recipe_eval, resize_images, resolution_sweep
from advtrain.losses import cross_entropy
from advtrain.parallel import ParallelModel, check_parallel_options, restore_run, resume_run, save_run_checkpoint
from advtrain.tokens import resize_reduce, sample_block_indices, sample_random_indices, vit_forward_tokens
from advtrain.training import (Dist, Every, Panel, Progress, RunDir, StepTimer, all_mean, autocast, barrier,
                               check_finite, check_sinks, check_timm_model, cycle, environment_meta, interactive,
                               log_due, make_mixup, open_sinks, plot_metrics, read_metrics, run_logger,
                               seeded_host_rng, setup_distributed, step_generator, take)
from recipes.advxl.config import Stage, TrainConfig, check_consistency, patch_size


# ================================================================================================ data


def build_sources(cfg: TrainConfig, size: int) -> tuple:
    """(train, val) advtrain.data sources whose training crop is ``size`` px (RandomResizedCrop of the original);
    CLIP-text mode reads captions and no labels (image-text shards)."""
    text = cfg.clip_text is not None
    return sources_from_config(cfg.data, cfg.augment, size=size, seed=cfg.run.seed,
                               randaugment=cfg.augment.randaugment, labels=not text, captions=text,
                               num_classes=None if text else cfg.model.num_classes)


def stage_loader(cfg: TrainConfig, dd: Dist, size: int, state: dict | None = None):
    """The training loader of a stage's image size, continuing ``state`` (the previous stage's loader: same batch
    and workers, so the sample stream goes on exactly); a resumed run builds its stage's loader and restores it."""
    loader = make_loader(build_sources(cfg, size)[0], batch_size=cfg.data.batch_size // dd.world, seed=cfg.run.seed,
                         rank=dd.rank, world=dd.world, num_workers=cfg.data.num_workers,
                         pin_memory=dd.device.type == "cuda")
    if state is not None:
        loader.load_state_dict(state)
    return loader


# ================================================================================================ model


class Normalized(nn.Module):
    """Pixels in [0, 1] in, normalization inside; ``indices`` runs a timm ViT on the kept tokens only."""

    def __init__(self, inner: nn.Module, mean, std, *, clip_dim: int | None = None):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # CLIP-text mode: the learnable temperature (log-parameter, CLIP's init log(1/0.07))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if clip_dim else None

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Tensor:
        z = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if indices is None:
            return self.inner(z)
        return vit_forward_tokens(self.inner, z, indices=indices)


def build_model(cfg: TrainConfig) -> Normalized:
    import timm

    m = cfg.model
    out_dim = m.num_classes
    kwargs = dict(m.kwargs)
    if m.name.startswith(("vit", "deit", "eva", "beit")):
        kwargs.setdefault("dynamic_img_size", True)  # one model for 112, 224 and 336 px
    inner = timm.create_model(m.name, pretrained=False, num_classes=out_dim, drop_path_rate=m.drop_path, **kwargs)
    if m.stem == "conv":
        from advtrain.models import convstem_

        convstem_(inner, channels=m.stem_channels)
    return Normalized(inner, m.mean, m.std, clip_dim=out_dim if cfg.clip_text else None)


def load_init_weights(cfg: TrainConfig, model: Normalized, log) -> None:
    """Starts the inner timm model from clean-pretrained weights (``model.init``), as Singh et al. recommend.

    ``timm:<name.tag>`` downloads timm's pretrained weights (needs internet); anything else is a local file
    (advtrain.models.load_weights: containers, ``module.`` / ``model.`` / ``inner.`` prefixes). ViT position
    embeddings are resampled to this grid (timm's ``checkpoint_filter_fn``). Strict (``model.init_strict``):
    a missing, unexpected or shape-mismatched key not matched by ``model.init_exclude`` fails naming every key;
    the report of every key is logged either way."""
    from advtrain.models import load_weights
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    m, src = cfg.model, cfg.model.init
    if src.startswith("timm:"):
        import timm

        src = timm.create_model(src[5:], pretrained=True).state_dict()
    vit_filter = checkpoint_filter_fn if isinstance(model.inner, VisionTransformer) else None
    r = load_weights(model.inner, src, strict=m.init_strict, ignore=("logit_scale", *m.init_exclude),
                     allow_missing=m.init_exclude, skip_mismatched=not m.init_strict, filter_fn=vit_filter)
    log(f"initialized from {m.init}: {r.summary()}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, position embeddings, class tokens and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "reg_token", "logit_scale"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ================================================================================================ schedule


def locate(cfg: TrainConfig, samples: int) -> tuple[int, int]:
    """(stage index, samples seen inside that stage) for a global sample count."""
    for i, s in enumerate(cfg.stages):
        if samples < s.samples:
            return i, samples
        samples -= s.samples
    return len(cfg.stages), 0


def lr_at(cfg: TrainConfig, stage: Stage, in_stage: int) -> float:
    """Per stage: linear warmup from 0 to the stage's peak lr, then cosine decay to min_lr at the stage's end."""
    peak, low = stage.lr or cfg.optim.lr, cfg.optim.min_lr
    if in_stage < stage.warmup_samples:
        return peak * (in_stage + 1) / stage.warmup_samples
    span = max(1, stage.samples - stage.warmup_samples)
    t = min(1.0, (in_stage - stage.warmup_samples) / span)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


# ================================================================================================ the step


def reduce_batch(x: Tensor, stage: Stage, model: Normalized, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Applies the stage's reducer: resized images, or token indices sampled once for attack and training."""
    match stage.reducer:
        case "none":
            return (x if x.shape[-1] == stage.img_size else resize_reduce(x, stage.img_size)), None
        case "resize":  # the loader already crops the original image to the stage size
            return (x if x.shape[-1] == stage.img_size else resize_reduce(x, stage.img_size)), None
        case "random_mask" | "block_mask":
            x = x if x.shape[-1] == stage.img_size else resize_reduce(x, stage.img_size)
            p = model.inner.patch_embed.patch_size[0]
            grid = (x.shape[-2] // p, x.shape[-1] // p)
            if stage.reducer == "random_mask":
                idx = sample_random_indices(x.shape[0], grid[0] * grid[1], keep_ratio=stage.keep_ratio, generator=g)
            else:
                idx = sample_block_indices(x.shape[0], grid=grid, keep_ratio=stage.keep_ratio, generator=g)
            return x, idx.to(x.device)
    raise ValueError(f"unknown reducer {stage.reducer!r}")


def train_step(cfg, model, raw, opt, ema, batch, stage: Stage, in_stage: int, step: int, dd: Dist, mixup,
               text, attacker: nn.Module) -> float:
    """One optimizer step: mix, reduce, attack (eval mode, same token indices), forward, backward, clip, step.

    ``attacker`` is the model the attack differentiates: ``raw``, or a compiled ``detach_params(raw)`` view.
    """
    x = batch[0].to(dd.device, non_blocking=True).float().div_(255)
    y = batch[1].to(dd.device, non_blocking=True) if batch[1] is not None else None  # None: image-text shards
    g = step_generator(cfg.run.seed, step, dd.rank)
    if mixup is not None:
        with seeded_host_rng(cfg.run.seed * 7919 + step * 31 + dd.rank):
            x, y = mixup(x, y)  # soft targets; the attack uses them too
    x, idx = reduce_batch(x, stage, raw, g)
    a = stage.attack
    if text is not None:  # CLIP-text mode: targets are the frozen text features of the captions
        y = text.features(batch[2]).to(dd.device)
    loss_fn = text.attack_loss(raw, y) if text is not None and a.steps else None  # one gather, on every rank
    ramp = min(1.0, (in_stage + 1) / stage.eps_warmup_samples) if stage.eps_warmup_samples else 1.0
    if a.steps:
        raw.eval()  # the attack sees the deterministic network (no drop path); pgd restores nothing else
        with autocast(cfg.run.precision, dd.device):
            if a.kind == "apgd":
                from advtrain.attacks import apgd

                x = apgd(functools.partial(attacker, indices=idx), x, y, eps=a.eps * ramp, steps=a.steps, norm=a.norm,
                         random_start=a.random_start, loss_fn=loss_fn, generator=g)
            else:
                x = pgd(functools.partial(attacker, indices=idx), x, y, eps=a.eps * ramp, step_size=a.step_size * ramp,
                        steps=a.steps, norm=a.norm, random_start=a.random_start, loss_fn=loss_fn, generator=g)
        raw.train()
    with autocast(cfg.run.precision, dd.device):
        out = model(x, indices=idx) if idx is not None else model(x)
        loss = text.loss(raw, out, y) if text is not None else cross_entropy(out, y, label_smoothing=0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    opt.step()
    if ema is not None:
        ema.update(raw, step=step)
    return float(loss.detach())


class TextMode:
    """CLIP-text mode: a frozen text tower, a caption-feature cache, the contrastive loss and its attack."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from advtrain.losses import load_text_tower, tiny_text_tower

        ct = cfg.clip_text
        self.tower = (tiny_text_tower(embed_dim=cfg.model.num_classes) if ct.tower == "tiny"
                      else load_text_tower(ct.tower, pretrained=ct.pretrained)).to(device)
        self.cache: dict = {}

    def features(self, captions: list[str]) -> Tensor:
        from advtrain.losses import embed_texts

        return embed_texts(self.tower, captions, cache=self.cache)

    def loss(self, raw: Normalized, image_features: Tensor, text_features: Tensor) -> Tensor:
        from advtrain.losses import clip_contrastive_loss

        return clip_contrastive_loss(image_features, text_features, logit_scale=raw.logit_scale, gather=True)

    def attack_loss(self, raw: Normalized, text_features: Tensor):  # the other ranks' captions as negatives
        from advtrain.losses import contrastive_attack_loss, gather_other_ranks

        return contrastive_attack_loss(logit_scale=raw.logit_scale, text_negatives=gather_other_ranks(text_features))

    def classifier(self, raw: nn.Module, names: list[str], templates) -> nn.Module:
        from advtrain.losses import ZeroShotHead, text_classifier

        w = text_classifier(self.tower, names, templates=list(templates), cache=self.cache)
        return nn.Sequential(raw, ZeroShotHead(w, logit_scale=raw.logit_scale.detach()))


# ================================================================================================ evaluation


def run_eval(cfg: TrainConfig, model: nn.Module, val_ds, dd: Dist, *, img_size: int, text, names, run_dir,
             name: str) -> dict:
    """Clean top-1, PGD-K and (optionally) AutoAttack on a stratified subset, at ``img_size``, in float32
    (advtrain.eval.recipe_eval); per-sample results in ``run_dir/eval/<name>.jsonl``."""
    e = cfg.eval
    batches = lambda: ((x if x.shape[-1] == img_size else resize_images(x, img_size), b[1])
                       for b in val_batches(cfg, val_ds, dd) for x in [b[0].to(dd.device).float().div(255)])
    clf = text.classifier(model, names, cfg.clip_text.templates) if text is not None else model
    return recipe_eval(clf, batches, norms=e.norms, eps={"linf": e.eps, "l2": e.l2_eps, "l1": e.l1_eps},
                       pgd_steps=e.pgd_steps, pgd_step_size=e.pgd_step_size, autoattack_samples=e.autoattack_samples,
                       seed=cfg.run.seed, results=Path(run_dir) / "eval" / f"{name}.jsonl",
                       progress=dd.main and interactive(), desc=f"eval {img_size}px")


def val_batches(cfg: TrainConfig, val_ds, dd: Dist) -> Iterator:
    """The validation batches, at most ``data.val_samples`` images: every rank reads all of them (recipe_eval
    shares the attacks among the ranks by sample position and gathers the counts)."""
    loader = make_loader(val_ds, batch_size=cfg.data.batch_size // dd.world, seed=cfg.run.seed,
                         num_workers=cfg.data.num_workers, train=False)
    return take(loader, cfg.data.val_samples)


def resolution_eval(cfg: TrainConfig, model: nn.Module, dd: Dist, *, text, names) -> list:
    """Clean and PGD accuracy at each ``eval.resolutions`` size (Singh et al.: higher test-time resolution); each
    size reads fresh evaluation crops of the original images (resize + center crop at that size), not resized ones."""
    e = cfg.eval
    clf = text.classifier(model, names, cfg.clip_text.templates) if text is not None else model
    pgd_k = functools.partial(pgd, eps=e.eps, step_size=e.pgd_step_size, steps=e.pgd_steps,
                              generator=torch.Generator(device=dd.device).manual_seed(cfg.run.seed))
    rows = []
    for size in e.resolutions:  # the sweep passes over the (capped) validation set once per size
        batches = [(b[0].float().div(255), b[1]) for b in val_batches(cfg, build_sources(cfg, size)[1], dd)]
        with autocast(cfg.run.precision, dd.device):
            rows += resolution_sweep(clf, batches, sizes=[size], attacks={f"pgd{e.pgd_steps}": pgd_k},
                                     device=dd.device, progress=dd.main and interactive())
    return rows


# ================================================================================================ validation


def validate(cfg: TrainConfig) -> None:
    """Every configuration error we can find before training starts, with a message that names it."""
    check_consistency(cfg)
    if not cfg.eval.norms or set(cfg.eval.norms) - {"linf", "l2", "l1"}:
        raise ValueError(f"eval.norms must be some of linf, l2, l1; got {list(cfg.eval.norms)}")
    check_timm_model(cfg.model.name)
    check_sinks(tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb)
    check_parallel_options(cfg.run.parallel, activation_checkpointing=cfg.run.activation_checkpointing,
                           split_bn=False, recycling=False, compile=cfg.run.compile)
    p = patch_size(cfg)
    if p:
        sizes = [s.img_size for s in cfg.stages] + ([cfg.eval.img_size] if cfg.eval.img_size else [])
        bad = [s for s in sizes if s % p]
        if bad:
            raise ValueError(f"image sizes {bad} are not divisible by the patch size {p} of {cfg.model.name}")
    elif any(s.reducer in ("random_mask", "block_mask") for s in cfg.stages):
        raise ValueError(f"token masks need a ViT; {cfg.model.name} has no patch tokens")
    d, world = cfg.data, int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.clip_text and d.kind == "folder":
        raise ValueError("CLIP-text mode needs captions: use image + caption WebDataset shards (data.kind='wds')")
    check_run_sources(*build_sources(cfg, cfg.stages[0].img_size), world=world, num_workers=d.num_workers,
                      batch_size=d.batch_size)
    init = cfg.model.init
    if init and not init.startswith("timm:") and not Path(init).exists():
        raise FileNotFoundError(f"model.init {init!r} does not exist")
    if cfg.data.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the world size")


# ================================================================================================ run directory


def attack_summary(cfg: TrainConfig) -> str:
    """What the run trains with, for the plot: ``standard training`` or each stage's attack."""
    if not any(s.attack.steps for s in cfg.stages):
        return "standard training (no attack)"
    return "adversarial: " + ", ".join(f"{s.name} {s.attack.kind.upper()}-{s.attack.steps}" if s.attack.steps
                                       else f"{s.name} clean" for s in cfg.stages)


def plot(run: RunDir, cfg: TrainConfig) -> Path | None:
    """metrics.png: the training loss and the evaluations at each stage's end, stage boundaries named."""
    edges, edge = [], 0
    for a, b in zip(cfg.stages, cfg.stages[1:]):
        edge += a.samples
        edges.append((edge, f"{a.name} | {b.name} ({b.img_size} px)"))
    robust = lambda k: k in ("clean", "autoattack") or (k.startswith("pgd") and k[3:].isdigit())  # noqa: E731
    panels = [Panel(title=f"training loss, {attack_summary(cfg)}", ylabel="training loss", keys=("loss",)),
              Panel(title="top-1 at the end of each stage", ylabel="top-1 (%)", kind="eval", keys=robust, scale=100)]
    return plot_metrics(read_metrics(run.metrics_path), run.path / "metrics.png", panels=panels,
                        total=cfg.total_samples, edges=edges)

# ================================================================================================ main


def main(cfg: TrainConfig, *, stop_after_samples: int | None = None) -> dict:
    """Trains every stage, evaluating at each stage's end; resumes from the run directory's latest checkpoint.

    Args:
        cfg: the resolved configuration.
        stop_after_samples: leave (as if preempted) after the first checkpoint at or beyond this many samples.

    Returns:
        ``{"evals", "run_dir", "finished", "seconds", "train_seconds", "final_weights"}``; the times are summed
        over resumed runs (a finished run re-run reports the times it took).
    """
    validate(cfg)
    dd = setup_distributed(device=cfg.run.device, threads=cfg.run.threads)
    log = run_logger("advxl", dd)
    run = RunDir(cfg.run.out_dir, dd=dd, log=log)
    run.prepare(cfg.to_dict(), meta=environment_meta(source=__file__), fresh=cfg.run.fresh)
    torch.manual_seed(cfg.run.seed)
    raw = build_model(cfg).to(dd.device)
    if cfg.model.init:  # before the EMA copy and any sharding; a resumed run's checkpoint then overwrites it
        load_init_weights(cfg, raw, log)
    text = TextMode(cfg, dd.device) if cfg.clip_text else None
    pm = ParallelModel(raw, dd, parallel=cfg.run.parallel, precision=cfg.run.precision, compile=cfg.run.compile,
                       activation_checkpointing=cfg.run.activation_checkpointing, ema_decay=cfg.optim.ema_decay)
    model, ema = pm.model, pm.ema  # DDP wrapper, or the FSDP-sharded raw itself; the EMA copied before either
    opt = torch.optim.AdamW(param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    val_ds = build_sources(cfg, max(s.img_size for s in cfg.stages))[1]  # evaluated at the full size
    state = resume_run(run, {"model": raw, "optim": opt, "ema": ema}, dd, pm=pm, log=log)
    size = cfg.stages[locate(cfg, min(state["samples_seen"], cfg.total_samples - 1) if state else 0)[0]].img_size
    loader, budget = stage_loader(cfg, dd, size), BadSampleBudget(max_fraction=cfg.data.bad_sample_budget)
    objects = {"model": raw, "optim": opt, "ema": ema, "loader": loader, "budget": budget}
    if state is not None:
        restore_run(state, objects, dd, pm=pm, log=log)
    samples, step, evals = (state["samples_seen"], state["step"], json.loads(state["evals"])) if state else (0, 0, [])
    timer = StepTimer(dd.device, state)

    def checkpoint() -> Path | None:  # every rank: the loader and RNG states are gathered from all of them
        return save_run_checkpoint(run.path, objects, dd, pm=pm, keep=cfg.run.keep_checkpoints, samples_seen=samples,
                                   step=step, stage=locate(cfg, samples)[0], evals=json.dumps(evals), **timer.state())

    if state is None:
        checkpoint()  # step 0: a run preempted before its first checkpoint resumes from here
    attacker = raw  # the attack's model (FSDP: sharded): eager input-only autograd.grad, no weight gradient
    if cfg.run.compile:
        model = torch.compile(model)
        # a compiled backward computes the gradient of every input that requires one: compile a view whose
        # parameters are detached, so that the attack's backward computes the input gradient only
        attacker = torch.compile(detach_params(raw))
    a = cfg.augment
    mixup = make_mixup(mixup=a.mixup, cutmix=a.cutmix, label_smoothing=a.label_smoothing,
                       num_classes=cfg.model.num_classes)
    sinks = open_sinks(run.path, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, config=cfg.to_dict()) \
        if dd.main else ()
    metrics, names = run.metrics(sinks=sinks), class_names(cfg.data, num_classes=cfg.model.num_classes)
    total, batch = cfg.total_samples, cfg.data.batch_size
    bar = Progress(total=total, initial=samples, unit="img", desc="advxl", dd=dd, every=cfg.run.log_every, log=log)
    batches, ckpt_due, finished = cycle(loader), Every(cfg.run.checkpoint_every, start=samples), True
    raw.train()
    while samples < total:
        si, in_stage = locate(cfg, samples)
        stage = cfg.stages[si]
        if stage.img_size != size:  # a loader per stage size, continuing the previous one's sample stream
            size, state = stage.img_size, loader.state_dict()
            loader = objects["loader"] = stage_loader(cfg, dd, size, state)
            batches = cycle(loader)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, stage, in_stage)
        b = timer.next(batches)
        budget.update(b.bad, good=len(b.keys), check=False)
        loss = train_step(cfg, model, raw, opt, ema, b, stage, in_stage, step, dd, mixup, text, attacker)
        timer.done(batch)
        check_finite(loss, step=step, where=f"stage {stage.name}")
        samples, step = samples + batch, step + 1
        stage_done = locate(cfg, samples)[0] != si
        bar.update(batch, stage=stage.name, px=stage.img_size, loss=loss, lr=opt.param_groups[0]["lr"])
        if log_due(step, every=cfg.run.log_every, total=None) or stage_done:  # the last step ends the last stage
            budget.check(across_ranks=dd.world > 1)
            metrics.write({"kind": "train", "samples": samples, "step": step, "stage": stage.name,
                           "lr": opt.param_groups[0]["lr"]} | all_mean({"loss": loss}, dd) | timer.window()
                          | budget.metrics())
        if stage_done:
            px = cfg.eval.img_size or stage.img_size  # not `size`: that is the training loader's
            r = run_eval(cfg, pm.for_eval(ema=ema is not None), val_ds, dd, img_size=px, text=text, names=names,
                         run_dir=run.path, name=stage.name)
            evals.append(r | {"kind": "eval", "stage": stage.name, "samples": samples, "img_size": px})
            log(f"stage {stage.name} done at {samples} samples: " + ", ".join(
                f"{k} {100 * v:.2f}%" for k, v in r.items() if isinstance(v, float)))
            metrics.write(evals[-1])
            pm.train()
        if ckpt_due(samples, force=stage_done):
            path = checkpoint()
            if path is not None:
                log(f"checkpoint {path.name}")
            if stop_after_samples is not None and stop_after_samples <= samples < total:
                finished = False
                break
    bar.close()
    metrics.close()
    seconds = timer.seconds
    if finished and cfg.eval.resolutions:
        sweep = resolution_eval(cfg, pm.for_eval(ema=ema is not None), dd, text=text, names=names)
        if dd.main:
            (run.path / "resolution.md").write_text(format_resolution_table(sweep))
            plot_resolution(sweep, run.path / "resolution.png")
            log("test-time resolution:\n" + format_resolution_table(sweep))
    if dd.main and finished:
        plot(run, cfg)
        (run.path / "results.md").write_text(results_table(evals, cfg))
        log(f"done in {seconds:.0f} s ({timer.train_seconds:.0f} s training steps); results in {run.path}")
    barrier(dd)
    return {"evals": evals, "run_dir": str(run.path), "finished": finished, "seconds": seconds,
            "train_seconds": timer.train_seconds,
            "final_weights": pm.full_state_dict()}

def results_table(evals: list[dict], cfg: TrainConfig) -> str:
    key = f"pgd{cfg.eval.pgd_steps}"
    head = f"| stage | px | samples | clean (%) | PGD-{cfg.eval.pgd_steps} (%) |"
    aa = any("autoattack" in e for e in evals)
    lines = [head + (" AutoAttack (%) |" if aa else ""), "|---|---|---|---|---|" + ("---|" if aa else "")]
    for e in evals:
        row = f"| {e['stage']} | {e['img_size']} | {e['samples']} | {100 * e['clean']:.2f} | {100 * e[key]:.2f} |"
        lines.append(row + (f" {100 * e['autoattack']:.2f} |" if aa and "autoattack" in e else (" - |" if aa else "")))
    return "\n".join(lines) + "\n"

"""Per-GPU memory of AdvXL training for ViT-B/16, L/16, H/14 and g/14 under DDP and FSDP, with and without
activation checkpointing: an analytic table (``advtrain.parallel.estimate_memory``), checked on CPU.

The table: each AdvXL preset's stages (ViT-B/16, L/16: 112 px PGD-1, 224 px PGD-3; ViT-H/14, g/14: 84 px PGD-2,
224 px and 336 px PGD-3) at its global batch (4096; ``recipes/advxl/config.py``) on ``--world`` GPUs (default 64,
i.e. 8 nodes of 8 GPUs: 64 images per GPU), bf16, AdamW.
Parameters counted from timm models built on the meta device; activations from the per-block formula of
``advtrain.parallel.vit_block_bytes_per_token``. None of these figures was measured on a GPU.

The check: the same functions against a measurement of tiny timm ViTs on this CPU. Two measurements, both
exact byte counts rather than allocator statistics:

* ``saved``: the distinct storages that autograd saves for the backward during a forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded;
* ``alive after forward``: the bytes of every storage created during the forward that is still alive after it
  (a ``TorchDispatchMode`` holding weak references to output storages); with activation checkpointing this is
  what the blocks keep (their inputs), whatever holds it. The input batch is held by the caller: it is added
  where the model saves it itself (not under autocast, which saves a bf16 copy).

Only the saved activations are modelled: the transient memory of the backward (activation gradients, a
recomputed block's temporaries) is not.

    python benchmarks/memory_model.py                       # table + check, writes results/memory_model.md
    python benchmarks/memory_model.py --world 128           # 32 images per GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.parallel import checkpoint_blocks_, estimate_memory, vit_block_bytes_per_token  # noqa: E402

GiB = 1024**3
MODELS = {  # the AdvXL preset of each model: its timm name and kwargs, stages (sizes, attacks) and global batch
    "ViT-B/16": "imagenet_vit_b16",
    "ViT-L/16": "imagenet_vit_l16",
    "ViT-H/14": "imagenet_vit_h14",
    "ViT-g/14": "imagenet_vit_g14",
}
SETUPS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))


# ================================================================================================ the table


def table(*, world: int, global_batch: int | None = None, precision: str = "bf16") -> list[dict]:
    """One row per model, preset stage and setup; ``global_batch`` None: each preset's ``data.batch_size``."""
    from recipes.advxl.config import preset

    rows = []
    for label, preset_name in MODELS.items():
        cfg = preset(preset_name)
        batch = global_batch or cfg.data.batch_size
        if batch % world:
            raise ValueError(f"global batch {batch} is not divisible by the world size {world}")
        per, name, kw = batch // world, cfg.model.name, dict(cfg.model.kwargs)
        for st in cfg.stages:
            size, stage = st.img_size, f"{st.name}, PGD-{st.attack.steps}"
            for parallel, ac in SETUPS:
                e = estimate_memory(
                    name,
                    img_size=size,
                    batch_per_gpu=per,
                    world=world,
                    parallel=parallel,
                    activation_checkpointing=ac,
                    precision=precision,
                    model_kwargs=kw,
                )
                rows.append(
                    {
                        "model": label,
                        "timm": name,
                        "stage": stage,
                        "img": size,
                        "tokens": e.tokens,
                        "batch": per,
                        "world": world,
                        "parallel": parallel,
                        "ac": ac,
                        "preset": (parallel, ac) == (cfg.run.parallel, cfg.run.activation_checkpointing),
                        "n_params": e.n_params,
                        **{
                            k: getattr(e, k) / GiB
                            for k in ("params", "grads", "optim", "working", "activations", "total")
                        },
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| model | params | stage | px (tokens) | setup | params GiB | grads GiB | AdamW GiB | working GiB "
        "| activations GiB | total GiB |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        setup = r["parallel"].upper() + (" + AC" if r["ac"] else "") + (" (preset)" if r.get("preset") else "")
        lines.append(
            f"| {r['model']} | {r['n_params'] / 1e6:.0f}M | {r['stage']} | {r['img']} ({r['tokens']}) | "
            f"{setup} | {r['params']:.2f} | {r['grads']:.2f} | {r['optim']:.2f} | {r['working']:.2f} | "
            f"{r['activations']:.2f} | {r['total']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ================================================================================================ the check


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create inside the mode and that are still alive; and their peak.

    Storages that existed before (parameters, inputs) are not counted. A weak reference to each new output
    storage subtracts its bytes when the storage is freed (storage objects live exactly as long as the
    underlying memory, whoever holds it: a tensor, autograd's saved variables, a checkpoint frame).
    """

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.live: dict[int, tuple] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = s._cdata
                if key in self.known or key in self.live:
                    continue
                n = s.nbytes()
                self.live[key] = (weakref.ref(s, lambda _r, k=key, n=n: self._free(k, n)), n)
                self.now += n
                self.peak = max(self.peak, self.now)
        return out


def tiny_vit(depth: int, **kw):
    import timm

    torch.manual_seed(0)
    cfg = (
        dict(img_size=32, patch_size=8, depth=depth, embed_dim=32, num_heads=2, num_classes=10, drop_path_rate=0.0) | kw
    )
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg), cfg


def _context(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def saved_bytes(model, x, mode: str) -> int:
    """Distinct storages saved for the backward by one forward (parameters excluded)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _context(mode):
        model(x)
    return sum(seen.values())


def live_after_forward(model, x, mode: str) -> int:
    """Bytes of the storages a training forward creates that are still alive after it (the output excluded)."""
    tracker = LiveBytes(list(model.parameters()) + list(model.buffers()) + [x])
    with tracker:
        with _context(mode):
            out = model(x)
        gc.collect()
        alive = tracker.now - out.untyped_storage().nbytes()
    return alive


def _block_copies(block) -> int:
    """Bytes of autocast's bf16 copies of a module's linear/conv weights (saved for the backward)."""
    return 2 * sum(q.weight.numel() for q in block.modules() if isinstance(q, (torch.nn.Linear, torch.nn.Conv2d)))


def check_rows() -> list[dict]:
    """Estimate vs CPU measurement for tiny ViTs: one block, and whole models with and without checkpointing.

    With checkpointing the estimate is the retained activations (block inputs and what lies outside the
    blocks) plus one recomputed block; the first part is compared with the bytes alive after the forward, the
    second is the one-block row.
    """
    rows = []
    batch, tokens = 4, 4 * 17
    for mode in ("fp32", "autocast", "bf16"):
        parallel, precision = {"fp32": ("ddp", "fp32"), "autocast": ("ddp", "bf16"), "bf16": ("fsdp", "bf16")}[mode]
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
        held = 0 if mode == "autocast" else x.nbytes  # the input itself is saved (autocast saves a bf16 copy)
        block = tokens * vit_block_bytes_per_token(dim=32, mlp_hidden=128, heads=2, mode=mode)
        copies = _block_copies(tiny_vit(1)[0].blocks[0]) if mode == "autocast" else 0
        measured = {d: saved_bytes(tiny_vit(d)[0].to(dtype).train(), x, mode) for d in (2, 4)}
        rows.append(
            {
                "mode": mode,
                "depth": "1 block",
                "pool": "-",
                "ac": False,
                "estimate": block + copies,
                "measured": (measured[4] - measured[2]) // 2,
                "how": "saved tensors",
            }
        )
        for depth, pool in ((2, "token"), (4, "token"), (2, "avg")):
            for ac in (False, True):
                m, cfg = tiny_vit(depth, global_pool=pool)
                m = m.to(dtype).train()
                kw = {k: v for k, v in cfg.items() if k != "num_classes"}
                e = estimate_memory(
                    "vit_tiny_patch16_224",
                    img_size=32,
                    batch_per_gpu=batch,
                    world=1,
                    parallel=parallel,
                    activation_checkpointing=ac,
                    precision=precision,
                    num_classes=10,
                    model_kwargs=kw,
                )
                outside_copies = 0
                if mode == "autocast":
                    outside_copies = _block_copies(m) - sum(_block_copies(b) for b in m.blocks)
                if ac:
                    checkpoint_blocks_(m)
                    rows.append(
                        {
                            "mode": mode,
                            "depth": depth,
                            "pool": pool,
                            "ac": True,
                            "estimate": e.activations - block + outside_copies,
                            "measured": live_after_forward(m, x, mode) + held,
                            "how": "alive after forward",
                        }
                    )
                else:
                    est = e.activations + (_block_copies(m) if mode == "autocast" else 0)
                    saved = saved_bytes(tiny_vit(depth, global_pool=pool)[0].to(dtype).train(), x, mode)
                    rows.append(
                        {
                            "mode": mode,
                            "depth": depth,
                            "pool": pool,
                            "ac": False,
                            "estimate": est,
                            "measured": saved,
                            "how": "saved tensors",
                        }
                    )
                    rows.append(
                        {
                            "mode": mode,
                            "depth": depth,
                            "pool": pool,
                            "ac": False,
                            "estimate": est,
                            "measured": live_after_forward(m, x, mode) + held,
                            "how": "alive after forward",
                        }
                    )
    for r in rows:
        r["ratio"] = r["estimate"] / r["measured"]
    return rows


def format_check(rows: list[dict]) -> str:
    lines = [
        "| compute | depth | pooling | AC | estimate (bytes) | measured (bytes) | measured as | estimate / measured |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['depth']} | {r['pool']} | {'yes' if r['ac'] else 'no'} | {r['estimate']:,} | "
            f"{r['measured']:,} | {r['how']} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# ================================================================================================ main


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=64, help="GPUs (default 64: 8 nodes x 8)")
    ap.add_argument(
        "--global-batch", type=int, default=None, help="images per step over all GPUs (default: each preset's)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_model.md"))
    ap.add_argument("--no-check", action="store_true", help="skip the CPU measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = table(world=args.world, global_batch=args.global_batch)
    check = [] if args.no_check else check_rows()
    batches = sorted({r["batch"] * args.world for r in rows})
    cmd = f"--world {args.world}" + (f" --global-batch {args.global_batch}" if args.global_batch else "")
    text = (
        f"# Per-GPU memory model (estimate, not measured on a GPU)\n\n"
        f"`python benchmarks/memory_model.py {cmd}`; torch {torch.__version__}. The AdvXL presets' stages "
        f"(`recipes/advxl/config.py`: imagenet_vit_b16, _l16, _h14, _g14; `(preset)` marks each preset's own "
        f"run.parallel / run.activation_checkpointing). Global batch {', '.join(map(str, batches))} on "
        f"{args.world} GPUs = {', '.join(str(b // args.world) for b in batches)} images per GPU; bf16 (DDP: "
        f"autocast over fp32 weights; FSDP: "
        f"bf16 MixedPrecisionPolicy); AdamW; no EMA. GiB = 2^30 bytes. `working`: DDP gradient buckets + "
        f"autocast's bf16 weight copies; FSDP: gathered root + 2 blocks and one block's unsharded gradient "
        f"with its reduce-scatter buffer. Activations: saved tensors at the start of the backward (+ one "
        f"recomputed block under activation checkpointing, AC). Not modelled: allocator fragmentation, "
        f"kernel workspaces, communication buffers.\n\n" + format_table(rows)
    )
    if check:
        text += (
            "\n## Check against CPU measurements (tiny timm ViTs, width 32, 2 heads, 17 tokens, batch 4)\n\n"
            "With AC the estimate shown is the retained part (block inputs, embeddings, head) without the "
            "recomputed block, which is the `1 block` row. Autocast rows include the bf16 weight copies "
            "that stay alive (the table counts them under `working`).\n\n" + format_check(check)
        )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return rows, check


if __name__ == "__main__":
    main()

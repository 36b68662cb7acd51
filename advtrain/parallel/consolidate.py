"""``python -m advtrain.parallel.consolidate CKPT_DIR OUT``: a sharded (DCP) checkpoint to one timm state dict.

Runs in one process, no GPU and no process group: reads the ``model`` (or ``--key ema``) state of a
:func:`advtrain.parallel.save_checkpoint` directory, strips the recipes' ``inner.`` prefix, and writes a plain
state dict (``.pt`` through ``torch.save``, ``.safetensors`` through safetensors) that
``timm.create_model(name).load_state_dict(sd, strict=True)`` and ``python -m advtrain.eval --checkpoint``
load. ``--timm-model NAME [--timm-kwargs JSON]`` checks exactly that before returning.

Example::

    python -m advtrain.parallel.consolidate runs/advxl/checkpoints/ckpt-000038400000 vit_h14.pt \\
        --timm-model vit_huge_patch14_224 --timm-kwargs '{"num_classes": 1000, "global_pool": "avg"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from advtrain.parallel._checkpoint import consolidate

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 1 when the timm check fails)."""
    ap = argparse.ArgumentParser(prog="python -m advtrain.parallel.consolidate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory written by advtrain.parallel.save_checkpoint")
    ap.add_argument("out", help="the file to write (.pt or .safetensors)")
    ap.add_argument("--key", default="model", choices=("model", "ema"), help="which weights (default: model)")
    ap.add_argument("--strip-prefix", default="inner.", help="removed from every name (default: inner.)")
    ap.add_argument("--drop", nargs="*", default=["logit_scale"], help="names left out (default: logit_scale)")
    ap.add_argument("--timm-model", default=None, help="check that this timm model loads the result strictly")
    ap.add_argument("--timm-kwargs", default="{}", help="JSON of timm.create_model keyword arguments")
    args = ap.parse_args(argv)
    sd = consolidate(args.checkpoint, args.out, key=args.key, strip_prefix=args.strip_prefix, drop=tuple(args.drop))
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.2f}M elements")
    if args.timm_model:
        import timm

        model = timm.create_model(args.timm_model, pretrained=False, **json.loads(args.timm_kwargs))
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            print(f"{args.timm_model} does not load {args.out} strictly: {err}", file=sys.stderr)
            return 1
        print(f"{args.timm_model} loads it with strict=True")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds ``advtrain.parallel.consolidate`` (the function) to the module; calling
    the module calls the function, so ``from advtrain.parallel import consolidate`` works either way."""

    def __call__(self, *args, **kwargs):
        return consolidate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())

"""Fixtures for the data tests: real Imagenette samples and small shard folders built from them in tmp_path."""

from __future__ import annotations

import pytest

from advtrain.data import iter_shard_samples


@pytest.fixture(scope="session")
def real_samples(shared_datasets) -> list[dict]:
    """The first 64 samples of imagenette224's first training shard: ``{"__key__", "jpg", "cls", "txt"}``."""
    out = []
    for s in iter_shard_samples(str(shared_datasets / "imagenette224" / "train-0000.tar.gz")):
        out.append({k: v for k, v in s.items() if k != "__url__"})
        if len(out) == 64:
            break
    return out


@pytest.fixture(scope="session")
def big_jpegs(real_samples) -> list[bytes]:
    """Four real images upscaled to ImageNet's typical 500 x 375 and re-encoded as JPEG quality 90."""
    import io

    from PIL import Image

    out = []
    for s in real_samples[:4]:
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out

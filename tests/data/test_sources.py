"""Shard specifications and reading (local, brace, pipe:, http), dealing, resampling, text shards, bad data."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import threading
from collections import Counter

import pytest
import torch
from PIL import Image

from advtrain.data import (
    BadSampleBudget,
    BadSampleError,
    ImageFolderSource,
    ShardedSampler,
    ShardReadError,
    ShardSource,
    TensorSource,
    check_sources,
    expand_urls,
    iter_shard_samples,
    make_loader,
    train_transform,
    val_transform,
)
from tests.data.shardkit import keyed, write_shard, write_shards

T32 = train_transform(size=32, scale=(0.35, 1.0))


def all_batches(loader, limit=10_000):
    out = []
    for b in loader:
        out.append(b)
        if len(out) >= limit:
            break
    return out


def keys_of(batches):
    return [k for b in batches for k in b.keys]


@pytest.fixture
def http_root(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (folder, base URL); stopped afterwards."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ------------------------------------------------------------------------------------------------ specifications


def test_expand_urls_forms(tmp_path, shared_datasets):
    root = shared_datasets / "imagenette224"
    assert expand_urls(root, split="val") == [str(root / "val-0000.tar.gz"), str(root / "val-0001.tar.gz")]
    assert expand_urls(str(root / "manifest.json"), split="train")[-1] == str(root / "train-0005.tar.gz")
    assert expand_urls("/d/train-{0000..0002}.tar") == [f"/d/train-000{i}.tar" for i in range(3)]
    assert expand_urls(["/a/x-{0..1}.tar", "pipe:cat /b/y.tar"]) == ["/a/x-0.tar", "/a/x-1.tar", "pipe:cat /b/y.tar"]
    assert expand_urls("/a/{x,y}.tar::/b/z.tar") == ["/a/x.tar", "/a/y.tar", "/b/z.tar"]
    assert expand_urls("https://host/s-{00..02}.tar")[2] == "https://host/s-02.tar"
    (tmp_path / "train-0001.tar").write_bytes(b"")
    (tmp_path / "train-0000.tar").write_bytes(b"")
    (tmp_path / "val-0000.tar").write_bytes(b"")
    assert expand_urls(tmp_path, split="train") == [str(tmp_path / "train-0000.tar"), str(tmp_path / "train-0001.tar")]
    with pytest.raises(ValueError, match="split="):
        expand_urls(root)
    with pytest.raises(ValueError, match="no test-"):
        expand_urls(tmp_path, split="test")
    with pytest.raises(TypeError):
        expand_urls(3)


# ------------------------------------------------------------------------------------------------ reading one shard


def test_local_gzip_pipe_and_http_shards_read_the_same_samples(tmp_path, real_samples, http_root):
    www, base = http_root
    samples = keyed(real_samples[:12], "s")
    tar = write_shard(tmp_path / "a.tar", samples)
    gz = write_shard(tmp_path / "a.tar.gz", samples, gzip=True)
    (www / "a.tar").write_bytes(tar.read_bytes())
    want = [(s["__key__"], s["jpg"], s["cls"]) for s in samples]
    for url in [str(tar), str(gz), f"file:{tar}", f"pipe:cat {tar}", f"pipe:gzip -dc {gz}", f"{base}/a.tar"]:
        got = [(s["__key__"], s["jpg"], s["cls"]) for s in iter_shard_samples(url)]
        assert got == want, url
        assert all(s["__url__"] == url for s in iter_shard_samples(url))
    # brace patterns over http, through the stream source
    for i in range(3):
        write_shard(www / f"part-{i}.tar", keyed(real_samples[4 * i : 4 * i + 4], f"p{i}"))
    src = ShardSource(f"{base}/part-{{0..2}}.tar", transform=T32, epochs=1, shuffle_shards=False, shuffle_buffer=0)
    got = keys_of(all_batches(make_loader(src, batch_size=4, seed=0)))
    assert got == [f"p{i}_{j:05d}" for i in range(3) for j in range(4)]
    with pytest.raises(ShardReadError, match="missing.tar"):
        list(iter_shard_samples(f"{base}/missing.tar"))  # curl -f: a 404 is an error, not an empty shard


def test_truncated_and_empty_shards_raise_naming_the_shard(tmp_path, real_samples):
    path = write_shard(tmp_path / "t.tar", keyed(real_samples[:10], "t"))
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(ShardReadError, match=r"cut\.tar is truncated \(after sample 't_0000\d'") as err:
        for s in iter_shard_samples(str(cut)):
            seen.append(s["__key__"])
    assert err.value.kind == "truncated" and err.value.url == str(cut) and err.value.after_key == seen[-1]
    # cut at a member boundary: tarfile alone would stop silently; the missing end-of-archive blocks give it away
    import tarfile

    with tarfile.open(path) as tar:
        boundary = tar.getmembers()[6].offset  # the header of sample 2's first member: sample 1, maybe
        # incomplete as far as the reader knows, is dropped with the error
    at_header = tmp_path / "hdr.tar"
    at_header.write_bytes(data[:boundary])
    with pytest.raises(ShardReadError, match="after sample 't_00000'.*end-of-archive"):
        list(iter_shard_samples(str(at_header)))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="empty") as err:
        list(iter_shard_samples(str(tmp_path / "empty.tar")))
    assert err.value.kind == "empty"
    with pytest.raises(ShardReadError, match="exit"):
        list(iter_shard_samples(f"pipe:cat {tmp_path / 'nope.tar'} 2>/dev/null"))


# ------------------------------------------------------------------------------------------------ dealing


@pytest.mark.parametrize("world,workers,n", [(1, 1, 3), (2, 3, 7), (4, 2, 8), (3, 1, 10)])
def test_shards_are_dealt_to_ranks_x_workers_without_overlap_and_with_full_coverage(world, workers, n):
    urls = [f"/s/{i}.tar" for i in range(n)]
    src = ShardSource(urls, transform=T32)
    orders = []
    for epoch in range(3):
        dealt = [
            src.bind(seed=5, rank=r, world=world).shards_for(epoch, worker=w, num_workers=workers)
            for r in range(world)
            for w in range(workers)
        ]
        flat = [u for d in dealt for u in d]
        assert sorted(flat) == sorted(urls)  # every shard once: no overlap, full coverage
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1
        orders.append(flat)
    assert n < 4 or orders[0] != orders[1]  # reshuffled each epoch


def test_ranks_and_workers_read_disjoint_samples_covering_the_split(tmp_path, real_samples):
    urls = write_shards(tmp_path, keyed(real_samples[:40], "k"), [6, 3, 9, 5, 8, 9])
    src = ShardSource(urls, transform=T32, epochs=1, shuffle_buffer=4)
    seen = []
    for rank in range(2):
        batches = all_batches(make_loader(src, batch_size=3, seed=1, rank=rank, world=2, num_workers=2))
        seen.append(keys_of(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"k_{i:05d}" for i in range(40))


def test_resampled_shards_draw_with_replacement_and_never_end(tmp_path, real_samples):
    urls = write_shards(tmp_path, keyed(real_samples[:12], "r"), [4, 4, 4])
    src = ShardSource(urls, transform=T32, resampled=True, shards_per_epoch=4).bind(seed=3)
    draws = [src.shards_for(e, worker=0, num_workers=1) for e in range(20)]
    assert all(len(d) == 4 for d in draws)
    assert any(len(set(d)) < len(d) for d in draws)  # with replacement: some epoch repeats a shard
    assert {u for d in draws for u in d} == set(urls)
    loader = make_loader(src, batch_size=8, seed=3)
    batches = all_batches(loader, limit=7)  # 56 samples from 12: it keeps going
    keys = keys_of(batches)
    assert len(keys) == 56 and set(keys) <= {f"r_{i:05d}" for i in range(12)}
    repeated = [k for k, c in Counter(keys).items() if c > 1]
    assert repeated  # a sample seen twice gets a different augmentation each time (seeded by the draw)
    imgs = {}
    for b in batches:
        for k, x in zip(b.keys, b.images):
            imgs.setdefault(k, []).append(x)
    assert any(not torch.equal(v[0], v[1]) for k, v in imgs.items() if len(v) > 1)
    with pytest.raises(ValueError, match="shards cannot feed"):
        next(iter(make_loader(ShardSource(urls[:1], transform=T32), batch_size=2, seed=0, world=2, rank=1)))


# ------------------------------------------------------------------------------------------------ image-text shards


def test_img2dataset_style_shards_give_captions_and_no_labels(tmp_path, real_samples):
    """img2dataset writes <key>.jpg|png|webp + <key>.txt + <key>.json, no .cls."""
    samples = []
    for i, s in enumerate(real_samples[:9]):
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        fmt = ["jpg", "png", "webp"][i % 3]
        buf = io.BytesIO()
        img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
        meta = {"url": f"https://example.com/{i}.{fmt}", "caption": f"caption {i}", "width": 224, "height": 224}
        samples.append(
            {
                "__key__": f"{i:09d}",
                fmt: buf.getvalue(),
                "txt": f"caption {i}".encode(),
                "json": json.dumps(meta).encode(),
            }
        )
    url = str(write_shard(tmp_path / "00000.tar", samples))
    src = ShardSource(url, transform=T32, labels=False, captions=True, epochs=1, shuffle_buffer=0)
    (b,) = all_batches(make_loader(src, batch_size=9, seed=0))
    assert b.labels is None and b.images.shape == (9, 3, 32, 32) and not b.bad
    assert b.captions == [f"caption {i}" for i in range(9)]
    # asking for labels: every sample lacks one, each is recorded
    src = ShardSource(url, transform=T32, labels=True, epochs=1)
    assert all_batches(make_loader(src, batch_size=4, seed=0)) == []
    with pytest.raises(ValueError, match="needs labels=True or captions=True"):
        ShardSource(url, labels=False, captions=False)
    report = pytest.raises(ValueError, match=r"no label \(needs \.cls")
    with report:
        check_sources({"train": ShardSource(url, transform=T32)}, world=1, num_workers=1)
    assert (
        check_sources({"train": ShardSource(url, transform=T32, labels=False, captions=True)}, world=1, num_workers=1)
        == []
    )


# ------------------------------------------------------------------------------------------------ bad data


def _bad_shards(tmp_path, real_samples):
    good = keyed(real_samples[:30], "g")
    broken = [
        {"__key__": "bad_decode", "jpg": b"\xff\xd8 this is not a jpeg", "cls": b"1"},
        {"__key__": "bad_nocls", "jpg": real_samples[0]["jpg"], "txt": b"x"},
        {"__key__": "bad_malformed", "jpg": real_samples[0]["jpg"], "cls": b"seven"},
        {"__key__": "bad_range", "jpg": real_samples[0]["jpg"], "cls": b"12"},
        {"__key__": "bad_noimage", "cls": b"3", "txt": b"no image"},
    ]
    a = write_shard(tmp_path / "a.tar", good[:10] + broken[:3])
    b = write_shard(tmp_path / "b.tar", good[10:20] + broken[3:])
    full = write_shard(tmp_path / "c.tar", good[20:30]).read_bytes()
    c = tmp_path / "c.tar"
    c.write_bytes(full[: len(full) * 2 // 3])  # truncated: the last samples are lost
    d = tmp_path / "d.tar"
    d.write_bytes(b"")  # empty
    return [str(a), str(b), str(c), str(d)]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_kind_of_bad_data_is_skipped_counted_and_named(tmp_path, real_samples, caplog, workers):
    urls = _bad_shards(tmp_path, real_samples)
    src = ShardSource(urls, transform=T32, num_classes=10, shuffle_buffer=3)
    # an endless stream: records found after a reader's last sample ride on its next epoch's first sample
    batches = all_batches(make_loader(src, batch_size=4, seed=0, num_workers=workers), limit=16)
    keys = keys_of(batches)
    assert not any(k.startswith("bad_") for k in keys)
    assert {f"g_{i:05d}" for i in range(20)} <= set(keys)  # every good sample of the intact shards
    records = [r for b in batches for r in b.bad]
    by_key = {(r.kind, r.key): r for r in records}
    for kind, key, url in [
        ("decode", "bad_decode", urls[0]),
        ("label", "bad_nocls", urls[0]),
        ("label", "bad_malformed", urls[0]),
        ("label", "bad_range", urls[1]),
        ("image", "bad_noimage", urls[1]),
    ]:
        assert by_key[(kind, key)].url == url
    assert "seven" in by_key[("label", "bad_malformed")].message
    assert "12 outside [0, 10)" in by_key[("label", "bad_range")].message
    truncated = [r for r in records if r.kind == "truncated"]
    assert truncated and {r.url for r in truncated} == {urls[2]} and truncated[0].key.startswith("g_")
    assert "is truncated" in truncated[0].message
    empty = [r for r in records if r.kind == "empty"]
    assert empty and {r.url for r in empty} == {urls[3]}
    # the budget counts them and logs each with shard and key
    budget = BadSampleBudget(max_fraction=1.0, min_samples=0)
    with caplog.at_level(logging.WARNING, logger="advtrain.data"):
        for b in batches:
            budget.update(b.bad, good=len(b.keys))
    m = budget.metrics()
    kinds = Counter(r.kind for r in records)
    assert m["bad_label"] == kinds["label"] >= 3 and m["bad_decode"] == kinds["decode"] >= 1
    assert m["bad_samples"] == sum(max(r.lost, 1) for r in records) and budget.good == len(keys)
    assert any("bad_malformed" in r.getMessage() and urls[0] in r.getMessage() for r in caplog.records)


def test_past_the_budget_the_run_stops_naming_the_worst_shards(tmp_path, real_samples):
    urls = _bad_shards(tmp_path, real_samples)
    src = ShardSource(urls, transform=T32, num_classes=10, shuffle_buffer=0, shuffle_shards=False)
    budget = BadSampleBudget(max_fraction=0.05, min_samples=10, log_first=0)
    with pytest.raises(BadSampleError, match=r"worst shards: \[\('[^']*a\.tar', 3\)") as err:
        for b in make_loader(src, batch_size=4, seed=0):
            budget.update(b.bad, good=len(b.keys))
    assert "budget 5.000%" in str(err.value)
    # the default budget (0.1%) is not enforced before min_samples reads
    fresh = BadSampleBudget()
    fresh.update([], good=10)
    assert fresh.max_fraction == 0.001
    state = budget.state_dict()
    again = BadSampleBudget()
    again.load_state_dict(state)
    assert again.metrics() == budget.metrics()


def test_manifest_mismatch_is_reported(tmp_path, real_samples):
    urls = write_shards(tmp_path, keyed(real_samples[:12], "m"), [5, 7])
    manifest = {
        "splits": {
            "train": {
                "count": 13,
                "shards": [{"file": "train-0000.tar", "count": 5}, {"file": "train-0001.tar", "count": 8}],
            }
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    src = ShardSource(tmp_path, split="train", transform=T32, epochs=1, shuffle_shards=False)
    assert src.urls == urls and src.counts == {urls[0]: 5, urls[1]: 8}
    endless = ShardSource(tmp_path, split="train", transform=T32, shuffle_shards=False)
    records = [r for b in all_batches(make_loader(endless, batch_size=4, seed=0), limit=5) for r in b.bad]
    (rec,) = records  # found at the end of the second shard, carried by the next epoch's first sample
    assert rec.kind == "manifest" and rec.url == urls[1] and rec.lost == 1
    assert "7 samples, the manifest says 8" in rec.message
    # before training: a shard file the manifest does not list is reported
    write_shard(tmp_path / "train-0002.tar", keyed(real_samples[:2], "x"))
    (warning,) = check_sources({"train": ShardSource(tmp_path, split="train", transform=T32)}, world=1, num_workers=1)
    assert "1 shard files" in warning and "train-0002.tar" in warning and "not in its manifest" in warning


# ------------------------------------------------------------------------------------------------ map-style sources


def test_folder_source_replaces_an_unreadable_file_by_the_next_one(tmp_path, real_samples):
    for i, s in enumerate(real_samples[:12]):
        d = tmp_path / f"class{i % 3}"
        d.mkdir(exist_ok=True)
        (d / f"img{i:02d}.jpg").write_bytes(s["jpg"])
    (tmp_path / "class1" / "img00_corrupt.jpg").write_bytes(b"\xff\xd8garbage")
    src = ImageFolderSource(tmp_path, transform=T32)
    assert src.classes == ["class0", "class1", "class2"] and len(src) == 13
    batches = all_batches(make_loader(src, batch_size=4, seed=0, train=True))
    assert [len(b.keys) for b in batches] == [4, 4, 4]  # equal batch sizes: DDP stays in lockstep
    records = [r for b in batches for r in b.bad]
    assert not any("corrupt" in k for k in keys_of(batches))
    corrupt = [i for i, (p, _) in enumerate(src.samples) if "corrupt" in p]
    drawn = ShardedSampler(13, seed=0, rank=0, world=1, batch=4).indices(0)
    assert [r.key for r in records] == (["class1/img00_corrupt.jpg"] if corrupt[0] in drawn else [])
    # evaluation order is fixed, so the corrupt file is met and replaced by the next index, recorded
    ev = all_batches(
        make_loader(ImageFolderSource(tmp_path, transform=val_transform(size=32)), batch_size=5, seed=0, train=False)
    )
    ev_records = [r for b in ev for r in b.bad]
    assert [(r.kind, r.key) for r in ev_records] == [("decode", "class1/img00_corrupt.jpg")]
    # "img00_corrupt" sorts first in class1: its successor stands in for it, so it appears twice
    assert sum(len(b.keys) for b in ev) == 13 and Counter(keys_of(ev))["class1/img01.jpg"] == 2


def test_folder_source_with_given_classes_labels_by_them_and_refuses_unknown_folders(tmp_path, real_samples):
    """An evaluation set holding some of a model's classes (ImageNet-R's 200 of 1000) keeps the model's labels."""
    for i, s in enumerate(real_samples[:6]):
        d = tmp_path / ("n02" if i % 2 else "n01")
        d.mkdir(exist_ok=True)
        (d / f"img{i}.jpg").write_bytes(s["jpg"])
    model_classes = ["n00", "n03", "n02", "n01"]
    src = ImageFolderSource(tmp_path, transform=T32, classes=model_classes)
    assert src.classes == model_classes and src.folder_classes == ["n01", "n02"]
    assert sorted({src[i].label for i in range(len(src))}) == [2, 3]
    assert [src[i].label for i in range(len(src))] == [3, 3, 3, 2, 2, 2]  # sorted folders: n01 first, then n02
    with pytest.raises(ValueError, match=r"1 class folder\(s\) are not among the 2 classes given \(e.g. \['n02'\]\)"):
        ImageFolderSource(tmp_path, classes=["n01", "n03"])
    assert ImageFolderSource(tmp_path).classes == ["n01", "n02"]  # without classes: the folder's own order


def test_tensor_source_batches():  # data-wait timing: advtrain.training.StepTimer (tests/training/test_loop.py)
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    src = TensorSource(x, torch.arange(10), transform=train_transform(size=8, scale=(1, 1), ratio=(1, 1)))
    b = next(iter(make_loader(src, batch_size=5, seed=0)))
    assert b.images.shape == (5, 3, 8, 8) and b.labels.dtype == torch.int64 and b.captions is None
    with pytest.raises(ValueError, match="uint8"):
        TensorSource(x.float(), torch.arange(10))


# ------------------------------------------------------------------------------------------------ before training


def test_check_sources_finds_every_problem_before_training(tmp_path, real_samples):
    urls = write_shards(tmp_path / "s", keyed(real_samples[:8], "c"), [4, 4])
    val = write_shards(tmp_path / "s", keyed(real_samples[8:12], "v"), [4], prefix="val")
    ok = {"train": ShardSource(urls, transform=T32), "val": ShardSource(val, transform=T32, epochs=1)}
    assert check_sources(ok, world=1, num_workers=1) == []
    (tmp_path / "s" / "train-0002.tar").write_bytes(b"")
    empty_warned = check_sources(
        {"train": ShardSource(urls + [str(tmp_path / "s" / "train-0002.tar")])}, world=1, num_workers=1
    )
    assert len(empty_warned) == 1 and "empty" in empty_warned[0]
    nocls = write_shard(tmp_path / "nocls.tar", [{"__key__": "x", "jpg": real_samples[0]["jpg"]}])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError) as err:
        check_sources(
            {
                "train": ShardSource(urls + [str(tmp_path / "gone.tar")], transform=T32),
                "val": ShardSource(val, transform=T32, epochs=1),
                "text": ShardSource(str(nocls), transform=T32),
                "digits": TensorSource(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.zeros(3).long()),
            },
            world=2,
            num_workers=2,
            batch_size=2,
            train=("train", "digits"),
        )
    msg = str(err.value)
    assert "gone.tar" in msg  # a missing path
    assert "'val': 1 shards cannot feed 4 readers (2 ranks x 2 workers)" in msg  # too few validation shards
    assert "'train': 3 shards cannot feed 4 readers" in msg
    assert "'text': sample 'x'" in msg and "needs .cls" in msg  # label keys of a drawn sample
    assert "'digits': 3 samples make no global batch of 2 x 2" in msg
    with pytest.raises(FileNotFoundError, match="class folder"):
        ImageFolderSource(tmp_path / "folder")  # a folder source finds an empty root when it is built
    resampled = {"train": ShardSource(urls, transform=T32, resampled=True)}
    assert check_sources(resampled, world=4, num_workers=4) == []  # resampled shards need no minimum count

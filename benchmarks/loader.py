"""Loader benchmark: stage-2 samples/s per loader process (one core), per input path.

    python benchmarks/loader.py [--samples 96] [--repeats 5] [--codecs float16,int8]

Builds, in a temporary folder, ImageNet-like WebDataset source shards from real photos (the
JPEGs of Debian's ``opencv-doc``: ``apt-get download opencv-doc && dpkg -x opencv-doc*.deb
/tmp/ocv``; each photo of at least 300 px is scaled to cover 500 x 375, centre-cropped and saved
at JPEG quality 98: these photos are smoother than ImageNet's, and quality 98 brings them to
~ImageNet's average file size of ~110 KB; the mean is recorded), and target caches at ViT-B/16
geometry (L = 196, C = 768, H = 12, k_max = 16, 224 px views, K = 2) and at the miniature's
(L = 49, C = 96, H = 3, 28 px): one per codec x pixels (none | jpeg | png). The cache's targets
are synthetic (storage.synthetic's ViT-shaped generator: loader speed depends on bytes and
compressibility, not on the values); its crops, flips and pixels are the real view policy's on
the real photos.

Then, in this one process (no DataLoader workers, one torch thread, files in the page cache),
it times micro-batches of 64 samples of random (sample, view) pairs, per path, in samples per
CPU second of the process (time.process_time: user + system time, so the figure is the cost on
one core even when the shared machine makes the process wait; wall-clock rates are kept too):

* ``source/<codec>/none``: today's path, stages.data.TrainDataset + collate: read and decode
  the source JPEG, render the view, read the cached record (float16 targets shipped as float16,
  int8 dequantised to float32 on the CPU), mask noise;
* ``cache/<codec>/<jpeg|png>``: the self-contained path, stages.loader.BatchedTrainDataset:
  batched record reads in stored dtypes (dequantised later on the device), the stored view
  image decoded, the recorded view checked against the policy, mask noise;
* ``cache-wds/<codec>/jpeg``: the same batched random access into a WebDataset cache with jpeg
  pixels (what ``read: random`` does with such a cache);
* ``stream/<codec>/jpeg``: that WebDataset cache read as ``tec train`` does with ``read:
  stream``: stages.loader.StreamingCacheDataset with the run's default shuffle buffer, iterated
  through the trainer's DataLoader (stages.loader.make_loader, 0 workers: in this process),
  one epoch per call (sequential reads of one view's tars, the next view the next epoch);
* ``targets/<codec>/none``: the batched target reads alone (what the cache costs per sample).

Every path runs ``--repeats`` times, interleaved (path A, B, C, A, B, C, ...), and the median
is reported with min and max: the machine is shared and noisy, so compare within one run. A
profile of one batch of the ViT-B cache path splits its time into record reads, pixel decode,
view check and mask noise. I/O amplification (bytes read / bytes used for one epoch that uses one
of K views per sample) is measured by counting the bytes of every read, for random access on
both backends, and computed for streaming whole WebDataset tars.

Writes benchmarks/results/loader.json: ``vitb_samples_per_s_per_core`` (path/codec/pixels ->
median samples/s), ``miniature_samples_per_s_per_core``, ``device`` (the GPU measurement, or
"not measured"), ``rows`` (median/min/max per path), ``profile``, ``io_amplification``,
``source`` (the photo set) and the common header.
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import REPO_ROOT, log, result_header, setup_logging, write_result  # noqa: E402

PHOTOS = "/tmp/ocv/usr/share/doc/opencv-doc/examples"
GEOMETRIES = {
    "vitb": dict(L=196, C=768, H=12, k_max=16, size=224, k=15),
    "miniature": dict(L=49, C=96, H=3, k_max=16, size=28, k=8),
}
VIEWS = 2
BATCH = 64


def source_photos(limit: int) -> list[bytes]:
    """Real photos as ImageNet-like JPEGs: cover 500 x 375, centre crop, quality 98."""
    from PIL import Image

    files = sorted(glob.glob(f"{PHOTOS}/**/*.jpg", recursive=True))
    if not files:
        raise SystemExit(f"no photos under {PHOTOS}: run `apt-get download opencv-doc && dpkg -x "
                         f"opencv-doc*.deb /tmp/ocv` first")
    out = []
    for f in files:
        with Image.open(f) as im:
            if min(im.size) < 300 or im.mode not in ("RGB", "L"):
                continue
            im = im.convert("RGB")
            scale = max(500 / im.width, 375 / im.height)
            im = im.resize((max(500, round(im.width * scale)), max(375, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - 500) // 2, (im.height - 375) // 2
            im = im.crop((left, top, left + 500, top + 375))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=98)
            out.append(buf.getvalue())
        if len(out) >= limit:
            break
    return out


def write_source(root: Path, photos: list[bytes], samples: int) -> list[str]:
    """Two WebDataset shards of `samples` photos (repeated if there are fewer photos)."""
    import tarfile

    root.mkdir(parents=True)
    shards = []
    per = math.ceil(samples / 2)
    for s in range(2):
        path = root / f"train-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(samples, (s + 1) * per)):
                for name, data in ((f"img{i:06d}.jpg", photos[i % len(photos)]),
                                   (f"img{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    return shards


def write_cache(root: Path, shards: list[str], geo: dict, codec: str, pixels: str,
                backend: str = "zarr") -> str:
    """A cache as stage 1 writes it (same writer, same view policy and pixel function), with
    synthetic ViT-shaped targets (16 distinct records, reused)."""
    from stages.sources import decode_image, open_source
    from stages.stage1 import part_names, stored_view_pixels
    from stages.views import ViewPolicy, render_views, view_params, views_to_arrays
    from storage import CacheSpec, create_cache
    from storage.synthetic import realistic_targets

    policy = ViewPolicy(seed=0, output_size=geo["size"])
    spec = CacheSpec(num_patches=geo["L"], channels=geo["C"], heads=geo["H"], k_max=geo["k_max"],
                     views=VIEWS, codec=codec, backend=backend, pixels=pixels,
                     image_size=geo["size"] if pixels != "none" else 0)
    source = open_source("webdataset", shards)
    counts = [source.count(s) for s in shards]
    patch = geo["size"] // math.isqrt(geo["L"])
    base_model = {"arch": "synthetic", "img_size": geo["size"], "patch_size": patch,
                  "embed_dim": geo["C"], "num_heads": geo["H"], "last_n": 2, "k_max": geo["k_max"]}
    writer = create_cache(root, spec, base_model=base_model,
                          view_policy={**policy.to_dict(), "views": VIEWS},
                          source={"kind": "webdataset", "path": "::".join(shards),
                                  "shards": shards, "num_samples": sum(counts)},
                          parts=list(zip(part_names(shards), counts)))
    rng = np.random.default_rng(0)
    pool = [realistic_targets(rng, geo["L"], geo["C"], geo["H"], geo["k_max"]) for _ in range(16)]
    n = 0
    for shard, part in zip(shards, writer.parts):
        with writer.open_part(part) as pw:
            for slot, sample in enumerate(source.samples(shard)):
                image = decode_image(sample.data)
                h, w = image.shape[:2]
                views = [view_params(policy, sample.key, v, h, w) for v in range(VIEWS)]
                crop, flip = views_to_arrays(views)
                rec = {name: np.stack([pool[(n + v) % 16][name] for v in range(VIEWS)])
                       for name in pool[0]}
                rec.update(crop=crop, flip=flip, source_size=(h, w), label=int(sample.label))
                if pixels != "none":
                    rendered = render_views(image, views, geo["size"], policy.interpolation)
                    rec["pixels"], _ = stored_view_pixels(rendered, pixels, spec.pixels_quality)
                pw.write(slot, sample.key, rec)
                n += 1
            pw.commit()
    writer.finalize()
    return str(root)


def make_path(kind: str, cache: str, shards: list[str], geo: dict):
    """A callable that loads one micro-batch of PlanItems, for one input path."""
    from stages.data import CacheRead, SourceIndex, TrainDataset, collate
    from stages.loader import BatchedTrainDataset
    from stages.views import ViewPolicy
    from storage import open_cache

    reader = open_cache(cache)
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    if kind == "source":
        index = SourceIndex.build("webdataset", shards)
        pos = {k: i for i, k in enumerate(reader.keys)}
        cache_index = np.array([pos.get(k, -1) for k in index.keys])
        ds = TrainDataset(index, policy, seed=0, num_patches=geo["L"],
                          cache=CacheRead(cache, cache_index, geo["k"], True,
                                          reader.spec.codec == "float16"))
        return lambda items: collate([ds[it] for it in items])
    if kind == "stream":  # read: stream, built and iterated as `tec train` does it
        from dataclasses import fields

        from stages.loader import LoaderSettings, StreamingCacheDataset, make_loader
        from stages.train import TrainConfig

        buffer = next(f.default for f in fields(TrainConfig) if f.name == "shuffle_buffer")
        stream = StreamingCacheDataset(reader, policy=policy, seed=0, num_patches=geo["L"],
                                       k=geo["k"], attention=True, batch_size=BATCH,
                                       shuffle_buffer=buffer)
        loader = make_loader(stream, LoaderSettings(0, None, False, False, "in this process"))
        epochs = iter(range(1 << 30))

        def epoch(_items):
            stream.set_position(next(epochs), 0)  # the next epoch: the other view's tars
            return sum(len(b) for b in loader)
        epoch.whole_epoch = True
        return epoch
    if kind == "targets":
        from storage.batch import fields_for

        fields = fields_for(reader.spec, attention=True, views=False)
        return lambda items: reader.read_batch([it.index for it in items],
                                               [it.view for it in items], fields)
    ds = BatchedTrainDataset(reader=reader, cache_index=np.arange(reader.num_samples),
                             keys=reader.keys, policy=policy, seed=0, num_patches=geo["L"],
                             k=geo["k"], attention=True, items=None)
    return ds.__getitems__


def batches(n_samples: int, seed: int) -> list[list]:
    """One epoch of random (sample, view) pairs in micro-batches (as the sample plan draws)."""
    from stages.data import PlanItem

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_samples)
    views = rng.integers(0, VIEWS, n_samples)
    items = [PlanItem(0, int(i), int(views[i]), False) for i in order]
    return [items[i:i + BATCH] for i in range(0, len(items) - BATCH + 1, BATCH)]


def time_path(load, n_samples: int, seed: int) -> tuple[float, float]:
    """(samples per CPU second, samples per wall second) of one epoch through `load`.

    CPU seconds (user + system of this process, time.process_time) are what a loader process
    costs on its core whatever else the machine runs; wall seconds include waiting for a core
    on a shared machine."""
    todo = batches(n_samples, seed)
    cpu, wall = time.process_time(), time.perf_counter()
    if getattr(load, "whole_epoch", False):  # a stream: one epoch in its own order
        n = load(None)
    else:
        for b in todo:
            load(b)
        n = sum(len(b) for b in todo)
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def profile_cache_path(cache: str, geo: dict, n_samples: int, repeats: int) -> dict:
    """CPU microseconds per sample of each step of the self-contained path (medians)."""
    from stages.data import mask_noise
    from stages.views import ViewPolicy, view_params
    from storage import open_cache
    from storage.batch import fields_for
    from storage.pixels import decode_pixels

    reader = open_cache(cache)
    policy = ViewPolicy.from_dict(reader.manifest["view_policy"])
    fields = fields_for(reader.spec, attention=True, views=True)
    parts: dict[str, list[float]] = {k: [] for k in ("read_targets", "read_pixels", "decode_pixels",
                                                     "check_views", "mask_noise")}
    for r in range(repeats):
        items = batches(n_samples, 100 + r)[0]
        s = np.array([it.index for it in items])
        v = np.array([it.view for it in items])
        clock = time.process_time
        t0 = clock()
        reader.read_batch(s, v, fields)
        t1 = clock()
        px = reader.read_batch(s, v, ["flip"], pixels=True)["pixels"]
        t2 = clock()
        out = np.empty((len(items), geo["size"], geo["size"], 3), np.uint8)
        for j, data in enumerate(px):
            decode_pixels(data, out=out[j])
        t3 = clock()
        for it in items:
            h, w = reader.source_size(it.index)
            view_params(policy, reader.keys[it.index], it.view, h, w)
        t4 = clock()
        for it in items:
            mask_noise(0, 0, it.index, geo["L"])
        t5 = clock()
        n = len(items)
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[key].append(dt / n)
    return {k: statistics.median(v) * 1e6 for k, v in parts.items()}


class ByteCounter:
    """Counts the bytes of every os.pread (the only read call the cache readers use)."""

    def __init__(self):
        self.bytes = 0
        self._orig = os.pread

    def __enter__(self):
        def counting(fd, n, offset):
            data = self._orig(fd, n, offset)
            self.bytes += len(data)
            return data
        os.pread = counting
        return self

    def __exit__(self, *exc):
        os.pread = self._orig


def io_amplification(tmp: Path, shards: list[str], geo: dict, n_samples: int) -> dict:
    """Bytes read / bytes used for one epoch that reads one of K views per sample."""
    from storage import open_cache
    from storage.batch import fields_for

    out = {}
    for backend in ("zarr", "webdataset"):
        cache = write_cache(tmp / f"amp-{backend}", shards, geo, "float16", "jpeg", backend)
        reader = open_cache(cache)
        fields = fields_for(reader.spec, attention=True, views=True)
        items = [it for b in batches(n_samples, 7) for it in b]
        s = np.array([it.index for it in items])
        v = np.array([it.view for it in items])
        # bytes used: the stored chunks (compressed) of the fields a step needs, and the image
        used = 0
        for i, view in zip(s, v):
            rec = reader.read(int(i), int(view), decode=False)
            used += len(bytes(rec["pixels"]))
        with ByteCounter() as pixels_only:
            reader.read_batch(s, v, ["flip"], pixels=True)
        fresh = open_cache(cache)
        with ByteCounter() as counter:
            fresh.read_batch(s, v, fields, pixels=True)
        if backend == "zarr":
            # compressed chunk bytes of the used fields (the pixels are counted above)
            used += sum(fresh.stored_nbytes(int(i), int(view), fields) for i, view in zip(s, v))
        else:
            # the record's member payloads (all of them are used); tar headers and padding not
            used = sum(fresh.stored_nbytes(int(i), int(view)) for i, view in zip(s, v))
        disk = sum(f.stat().st_size for f in Path(cache, "parts").rglob("*") if f.is_file())
        out[backend] = {"random_access_bytes_read": counter.bytes, "bytes_used": used,
                        "random_access_amplification": counter.bytes / used,
                        "pixels_only_bytes_read": pixels_only.bytes, "cache_bytes_on_disk": disk}
        if backend == "webdataset":
            # streaming reads whole view tars: round robin one view's tars per epoch (what
            # StreamingCacheDataset does), a uniform view choice needs every view's tars
            from storage.batch import stream_view

            streamed = 0
            for part in fresh.parts:
                streamed += Path(cache, "parts", part, "view-0.tar").stat().st_size
                for _ in stream_view(fresh, part, 0):  # the stream itself, crc-checked
                    pass
            tars = sum(f.stat().st_size for f in Path(cache, "parts").rglob("*.tar"))
            per_record = used / len(s)
            out[backend]["stream_round_robin_bytes_read"] = streamed
            out[backend]["stream_round_robin_amplification"] = streamed / (
                per_record * fresh.num_samples)
            out[backend]["stream_uniform_amplification"] = tars / (per_record * fresh.num_samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codecs", default="float16,int8")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "loader.json"))
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    os.environ.setdefault("TEC_CACHE_FSYNC", "0")
    started = time.perf_counter()
    result = result_header("loader")
    codecs = [c for c in args.codecs.split(",") if c]
    photos = source_photos(max(args.samples, 64))
    sizes = [len(p) for p in photos]
    result["source"] = {
        "photos": len(photos), "from": "opencv-doc example JPEGs (real photos), scaled to cover "
        "500x375, centre-cropped, JPEG quality 98", "mean_bytes": float(np.mean(sizes)),
        "median_bytes": float(np.median(sizes)), "size": [375, 500]}
    log.info("source: %d photos, mean %.0f bytes", len(photos), np.mean(sizes))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tec-loader-") as tmpdir:
        tmp = Path(tmpdir)
        for geo_name, geo in GEOMETRIES.items():
            shards = write_source(tmp / f"src-{geo_name}", photos, args.samples)
            paths = {}
            for codec in codecs:
                caches = {}
                for pixels in ("none", "jpeg", "png"):
                    caches[pixels] = write_cache(tmp / f"{geo_name}-{codec}-{pixels}", shards, geo,
                                                 codec, pixels)
                paths[f"source/{codec}/none"] = make_path("source", caches["none"], shards, geo)
                paths[f"targets/{codec}/none"] = make_path("targets", caches["none"], shards, geo)
                for pixels in ("jpeg", "png"):
                    paths[f"cache/{codec}/{pixels}"] = make_path("cache", caches[pixels], shards,
                                                                 geo)
                wds = write_cache(tmp / f"{geo_name}-{codec}-jpeg-wds", shards, geo, codec, "jpeg",
                                  "webdataset")
                paths[f"cache-wds/{codec}/jpeg"] = make_path("cache", wds, shards, geo)
                paths[f"stream/{codec}/jpeg"] = make_path("stream", wds, shards, geo)
            for load in paths.values():  # warm the page cache and the readers
                load(batches(args.samples, 99)[0])
            rates: dict[str, list[float]] = {k: [] for k in paths}
            walls: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(args.repeats):
                for key, load in paths.items():
                    cpu_rate, wall_rate = time_path(load, args.samples, r)
                    rates[key].append(cpu_rate)
                    walls[key].append(wall_rate)
                log.info("%s repeat %d (samples per CPU second): %s", geo_name, r,
                         ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
            rows[geo_name] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v),
                                  "runs": v, "wall_median": statistics.median(walls[k])}
                              for k, v in rates.items()}
            if geo_name == "vitb":
                result["profile_us_per_sample"] = {
                    f"{codec}/jpeg": profile_cache_path(str(tmp / f"vitb-{codec}-jpeg"), geo,
                                                         args.samples, args.repeats)
                    for codec in codecs}
                result["io_amplification"] = io_amplification(tmp, shards, geo, args.samples)
    result["vitb_samples_per_s_per_core"] = {k: round(v["median"], 1)
                                             for k, v in rows["vitb"].items()}
    result["miniature_samples_per_s_per_core"] = {k: round(v["median"], 1)
                                                  for k, v in rows["miniature"].items()}
    result["device"] = {"gpu": "not measured", "why": "no GPU was lent to this session"}
    result["rows"] = rows
    result["settings"] = {"samples": args.samples, "views": VIEWS, "batch": BATCH,
                          "repeats": args.repeats, "codecs": codecs, "geometries": GEOMETRIES,
                          "torch_threads": 1, "page_cache": "warm (files just written)"}
    result["runtime_s"] = time.perf_counter() - started
    write_result(result, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()


PATH_LABELS = [
    ("source", "none", "today's path: source JPEG decoded, view rendered, record read per sample"),
    ("cache", "jpeg", "self-contained cache, jpeg pixels (quality 90), batched"),
    ("cache", "png", "self-contained cache, png pixels, batched"),
    ("cache-wds", "jpeg", "WebDataset cache, jpeg pixels, batched random access (`read: random`)"),
    ("stream", "jpeg", "WebDataset cache, jpeg pixels, streamed as `tec train` does (`read: "
                       "stream`)"),
    ("targets", "none", "batched target reads alone (no pixels)"),
]


def markdown(r: dict) -> str:
    """The README tables of a loader.json result (rendered by benchmarks/report.py)."""
    codecs = r["settings"]["codecs"]
    lines = []
    for geo, title in (("vitb", "ViT-B/16 (L 196, C 768, H 12, k_max 16, 224 px)"),
                       ("miniature", "miniature (L 49, C 96, H 3, k_max 16, 28 px)")):
        rows = r["rows"][geo]
        lines += [f"Samples per CPU second of one loader process, {title}; median (min-max) of "
                  f"{r['settings']['repeats']} interleaved repeats:", "",
                  "| input path | " + " | ".join(codecs) + " |",
                  "|---|" + "---:|" * len(codecs)]
        for kind, pixels, label in PATH_LABELS:
            cells = []
            for c in codecs:
                row = rows.get(f"{kind}/{c}/{pixels}")
                cells.append("n/a" if row is None else
                             f"{row['median']:,.0f} ({row['min']:,.0f}-{row['max']:,.0f})")
            lines.append(f"| {label} (`{kind}/<codec>/{pixels}`) | " + " | ".join(cells) + " |")
        lines.append("")
    prof = r.get("profile_us_per_sample", {})
    if prof:
        names = list(next(iter(prof.values())))
        lines += ["CPU microseconds per sample of the self-contained jpeg path at ViT-B/16, "
                  "by step (medians):", "", "| step | " + " | ".join(prof) + " |",
                  "|---|" + "---:|" * len(prof)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{prof[k][n]:.0f}" for k in prof) + " |")
        lines.append("")
    amp = r.get("io_amplification", {})
    if amp:
        z, w = amp["zarr"], amp["webdataset"]
        lines += ["I/O amplification of one epoch (one of K = 2 views per sample; bytes read / "
                  "bytes the step uses, ViT-B/16 float16 + jpeg, measured by counting every read):",
                  "", "| read pattern | backend | bytes read / used |", "|---|---|---:|",
                  f"| random access (`read_batch`) | zarr | "
                  f"{z['random_access_amplification']:.4f} |",
                  f"| random access (`read_batch`, records.npy offsets) | webdataset | "
                  f"{w['random_access_amplification']:.4f} |",
                  f"| streaming, round-robin view (`StreamingCacheDataset`) | webdataset | "
                  f"{w['stream_round_robin_amplification']:.4f} |",
                  f"| streaming, uniform view choice (every view's tar) | webdataset | "
                  f"{w['stream_uniform_amplification']:.4f} |", ""]
    src = r["source"]
    lines.append(f"Source: {src['photos']} {src['from']}; mean {src['mean_bytes'] / 1e3:.1f} KB. "
                 f"GPU: {r['device']['gpu']} ({r['device']['why']}).")
    return "\n".join(lines)

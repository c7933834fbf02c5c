"""Evaluation of frozen encoders: k-NN and linear probe on the cls token and on mean-pooled patches.

Features come from a timm VisionTransformer (``forward_features``: tokens after the final norm)
or from a NewModel (``forward_encoder_features``). Both read-outs are reported side by side
(DESIGN §8):

    cls   [N, D]   token 0 of the final-norm output
    mean  [N, D]   mean of the patch tokens (prefix tokens excluded) of the same output

The classifiers work on precomputed features only, so the encoder runs once per split.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.configs import EvalConfig
from stages.optim import cosine_decay
from tec.targets import normalize_images

log = logging.getLogger(__name__)

METRICS = ("knn_cls", "knn_mean", "linear_cls", "linear_mean")


class EvalError(ValueError):
    """Evaluation inputs are unusable (message names the value at fault and what to do)."""


# ----------------------------------------------------------------------------------------------
# Images and features


def load_eval_images(
    source_shards: Any, img_size: int, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Decode a labelled image source and resize each whole image to ``img_size``.

    source_shards: a shard spec for :func:`stages.sources.expand_shards` (brace pattern, glob,
        directory or list of those) of webdataset tars, or an already opened source object
        (``shards()`` / ``samples(shard)``).
    Returns ``(images, labels)``: uint8 ``[N, 3, S, S]`` (bicubic, antialiased; no crop, so the
    aspect ratio is not kept) and int64 ``[N]`` (-1 where a sample has no label). Samples that fail
    to read or decode are skipped and counted in the log; ``limit`` caps N.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from stages.sources import BadSample, WebDatasetSource, decode_image

    if hasattr(source_shards, "samples") and hasattr(source_shards, "shards"):
        source = source_shards
    else:
        source = WebDatasetSource(source_shards)  # expand_shards raises for a pattern with no match

    images: list[Tensor] = []
    labels: list[int] = []
    skipped = 0
    for shard in source.shards():
        for sample in source.samples(shard):
            if limit is not None and len(images) >= limit:
                break
            if sample.error is not None or sample.data is None:
                skipped += 1
                continue
            try:
                array = decode_image(sample.data)
            except BadSample as exc:
                log.debug("skipping %s: %s", sample.key, exc)
                skipped += 1
                continue
            chw = torch.from_numpy(array).permute(2, 0, 1).contiguous()
            images.append(
                TF.resize(
                    chw, [img_size, img_size], interpolation=InterpolationMode.BICUBIC,
                    antialias=True,
                )
            )
            labels.append(int(sample.label))
        if limit is not None and len(images) >= limit:
            break
    if skipped:
        log.warning("eval data %s: skipped %d unreadable samples", source_shards, skipped)
    if not images:
        raise EvalError(f"eval data: no decodable images in {source_shards!r}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _batches(
    images: Tensor | Iterable, labels: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(uint8 [B, 3, H, W], int64 [B] or None)`` from a tensor or an iterable of batches."""
    if isinstance(images, Tensor):
        for start in range(0, images.shape[0], batch_size):
            stop = start + batch_size
            yield images[start:stop], None if labels is None else labels[start:stop]
        return
    for item in images:
        if isinstance(item, (tuple, list)):
            yield item[0], torch.as_tensor(item[1])
        else:
            yield item, None


def encoder_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """Encoder output after the final norm: ``images`` float [B, 3, H, W] -> [B, P + L, D].

    P = ``model.num_prefix_tokens`` (1 for a cls-token ViT). A NewModel is read through
    ``forward_encoder_features`` (unmasked encoder), a timm ViT through ``forward_features``.
    """
    forward = getattr(model, "forward_encoder_features", None) or model.forward_features
    return forward(images)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Tensor | Iterable,
    labels: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    amp: bool = False,
) -> dict[str, Tensor]:
    """Frozen cls and mean-patch features of a set of images.

    model: timm VisionTransformer (num_classes=0) or NewModel; moved to ``device``, run in eval
        mode (its training flag is restored afterwards).
    images: uint8 [N, 3, H, W], or an iterable (e.g. a DataLoader) of uint8 [B, 3, H, W] batches or
        ``(images, labels)`` pairs. Pixels are normalised with :func:`tec.targets.normalize_images`.
    labels: int64 [N] for a tensor input (optional).
    amp: bfloat16 autocast on CUDA; outputs are float32 either way.
    Returns ``cls`` [N, D] and ``mean`` [N, D] (float32, CPU) and ``labels`` int64 [N] (-1 when
    unknown).
    """
    device = torch.device(device)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if prefix < 1 or getattr(model, "cls_token", True) is None:
        raise EvalError(
            f"model {type(model).__name__} has no class token; evaluate a cls-token ViT"
        )
    was_training = model.training
    model.to(device).eval()
    cls_parts, mean_parts, label_parts = [], [], []
    try:
        for batch, batch_labels in _batches(images, labels, batch_size):
            if batch.dtype != torch.uint8:
                raise EvalError(f"extract_features: expected uint8 images, got {batch.dtype}")
            x = normalize_images(batch.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type == "cuda"):
                tokens = encoder_tokens(model, x)  # [B, P + L, D]
            tokens = tokens.float()
            cls_parts.append(tokens[:, 0].cpu())
            mean_parts.append(tokens[:, prefix:].mean(dim=1).cpu())
            if batch_labels is None:
                batch_labels = torch.full((batch.shape[0],), -1, dtype=torch.int64)
            label_parts.append(batch_labels.to("cpu", torch.int64))
    finally:
        model.train(was_training)
    if not cls_parts:
        raise EvalError("extract_features: no images given")
    return {
        "cls": torch.cat(cls_parts),
        "mean": torch.cat(mean_parts),
        "labels": torch.cat(label_parts),
    }


# ----------------------------------------------------------------------------------------------
# k-NN


def _check_labels(name: str, labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() != n:
        raise EvalError(f"{name}: {labels.numel()} labels for {n} feature rows")
    if n == 0:
        raise EvalError(f"{name}: empty split; give at least one labelled sample")
    if int(labels.min()) < 0:
        raise EvalError(f"{name}: samples without labels (-1); evaluate a labelled dataset")
    return labels


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    inferred = max(int(lab.max()) for lab in labels) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise EvalError(f"num_classes={num_classes} but labels go up to {inferred - 1}")
    return num_classes


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    k: int = EvalConfig.knn_k,
    temperature: float = EvalConfig.knn_temperature,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """Weighted k-NN class predictions (DINO's ``knn_classifier``).

    train_feats [N, D], train_labels int64 [N], test_feats [M, D]. Features are L2-normalised;
    each test row takes its ``k`` most cosine-similar training rows and votes for their labels with
    weight ``exp(sim / temperature)``, computed as ``exp((sim - max sim) / temperature)`` (the
    same vote up to a per-row factor) so that small temperatures cannot overflow float32: at
    T = 0.01 a similarity near 1 would give exp(100) = inf and a vote decided by ties. The test
    set is processed ``chunk_size`` rows at a time so memory stays O(chunk_size * N). Returns
    int64 [M] on CPU (ties go to the lower class index).
    """
    device = torch.device(device) if device is not None else train_feats.device
    train_labels = _check_labels("knn train", train_labels, train_feats.shape[0]).to(device)
    num_classes = _num_classes(num_classes, train_labels)
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)
    preds = []
    for start in range(0, test_feats.shape[0], chunk_size):
        test = F.normalize(test_feats[start:start + chunk_size].to(device, torch.float32), dim=1)
        sim = test @ train.T  # [b, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [b, k]
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # top_sim is sorted
        votes = torch.zeros(test.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = EvalConfig.knn_k,
    temperature: float = EvalConfig.knn_temperature,
    num_classes: int | None = None,
    *,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on ``test_labels`` int64 [M]."""
    test_labels = _check_labels("knn test", test_labels, test_feats.shape[0])
    train_labels = _check_labels("knn train", train_labels, train_feats.shape[0])
    num_classes = _num_classes(num_classes, train_labels, test_labels)
    preds = knn_predict(
        train_feats, train_labels, test_feats, k=k, temperature=temperature,
        num_classes=num_classes, chunk_size=chunk_size, device=device,
    )
    return 100.0 * (preds == test_labels).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Linear probe


def split_holdout(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic random split of ``range(n)`` into (train_idx [n - m], holdout_idx [m]).

    m = round(n * fraction), at least 1 and at most n - 1; both index tensors are sorted int64.
    Use it to choose probe hyper-parameters without touching the test split.
    """
    if not 0.0 < fraction < 1.0:
        raise EvalError(f"holdout fraction {fraction} must be between 0 and 1 (exclusive)")
    if n < 2:
        raise EvalError(f"holdout split needs at least 2 samples, got {n}")
    m = min(max(1, round(n * fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[m:].sort().values, perm[:m].sort().values


def _cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cosine_decay(progress, base_lr)


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = EvalConfig.linear_epochs,
    lr: float = EvalConfig.linear_lr,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    warmup_epochs: int = 5,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy (percent) of a linear classifier trained on frozen features.

    train_feats [N, D], train_labels int64 [N], test_feats [M, D], test_labels int64 [M].
    As in MAE's linear probe, features are standardised per channel (a BatchNorm without affine,
    eps 1e-6, here with the exact train-set mean/variance so the result does not depend on batch
    order), then one Linear(D, classes) (zero init) is trained with cross-entropy, AdamW and a
    per-step linear-warmup + cosine schedule. Same inputs and seed give the same number.
    The problem is convex, so the result is insensitive to these defaults (on 60k x 192 features
    lr 1e-3..3e-2 and 50..100 epochs agree within 0.1 points); :func:`choose_lr` checks on a
    held-out part of the training split.
    """
    device = torch.device(device) if device is not None else train_feats.device
    train_labels = _check_labels("linear train", train_labels, train_feats.shape[0])
    test_labels = _check_labels("linear test", test_labels, test_feats.shape[0])
    num_classes = _num_classes(num_classes, train_labels, test_labels)

    train_x = train_feats.to(device, torch.float32)
    mean = train_x.mean(dim=0)
    std = (train_x.var(dim=0, unbiased=False) + 1e-6).sqrt()
    train_x = (train_x - mean) / std
    test_x = (test_feats.to(device, torch.float32) - mean) / std
    train_y = train_labels.to(device)

    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total // 2)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, total, warmup, lr)
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach() * idx.numel()  # no per-step host sync
            step += 1
        if epoch == epochs - 1 or epoch % 10 == 0:
            log.debug("linear probe epoch %d: loss %.4f", epoch, epoch_loss.item() / n)

    with torch.no_grad():
        preds = torch.cat(
            [head(test_x[s:s + 8192]).argmax(dim=1) for s in range(0, test_x.shape[0], 8192)]
        )
    return 100.0 * (preds.cpu() == test_labels).float().mean().item()


def choose_lr(
    train_feats: Tensor,
    train_labels: Tensor,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2),
    *,
    fraction: float = 0.1,
    seed: int = 0,
    **probe_kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """Pick the linear-probe learning rate on a held-out part of the training split.

    Returns ``(best_lr, {lr: holdout top-1 percent})``; ties go to the first lr listed.
    """
    fit_idx, val_idx = split_holdout(train_feats.shape[0], fraction, seed)
    train_labels = torch.as_tensor(train_labels)
    scores = {
        lr: linear_probe(
            train_feats[fit_idx], train_labels[fit_idx], train_feats[val_idx],
            train_labels[val_idx], lr=lr, seed=seed, **probe_kwargs,
        )
        for lr in lrs
    }
    best = max(scores, key=lambda lr: scores[lr])
    log.info("linear probe lr choice %s -> %s", scores, best)
    return best, scores


# ----------------------------------------------------------------------------------------------
# Whole-model evaluation and reporting


def evaluate_model(
    model: nn.Module,
    train_images: Tensor | Iterable,
    train_labels: Tensor | None,
    test_images: Tensor | Iterable,
    test_labels: Tensor | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = EvalConfig.batch_size,
    amp: bool = False,
    k: int = EvalConfig.knn_k,
    temperature: float = EvalConfig.knn_temperature,
    linear: dict[str, Any] | None = None,
) -> dict[str, float]:
    """k-NN and linear-probe top-1 (percent) on the cls and mean-patch features of ``model``.

    train_images / test_images: uint8 [N, 3, H, W] with int64 [N] labels, or iterables of
    ``(images, labels)`` batches with labels None. ``linear``: extra :func:`linear_probe` keyword
    arguments (epochs, lr, ...). Returns ``{'knn_cls', 'knn_mean', 'linear_cls', 'linear_mean'}``.
    """
    for name, images, labels in (("train", train_images, train_labels),
                                 ("test", test_images, test_labels)):
        if isinstance(images, Tensor) and labels is None:
            raise EvalError(f"evaluate_model: {name} images given without labels")
    train = extract_features(model, train_images, train_labels, device=device,
                             batch_size=batch_size, amp=amp)
    test = extract_features(model, test_images, test_labels, device=device,
                            batch_size=batch_size, amp=amp)
    num_classes = _num_classes(
        None,
        _check_labels("train split", train["labels"], train["labels"].numel()),
        _check_labels("test split", test["labels"], test["labels"].numel()),
    )
    probe_device = device if torch.device(device).type == "cuda" else None
    results = {}
    for readout in ("cls", "mean"):
        results[f"knn_{readout}"] = knn_classify(
            train[readout], train["labels"], test[readout], test["labels"], k=k,
            temperature=temperature, num_classes=num_classes, device=probe_device,
        )
        results[f"linear_{readout}"] = linear_probe(
            train[readout], train["labels"], test[readout], test["labels"],
            num_classes=num_classes, device=probe_device, **(linear or {}),
        )
    log.info("evaluation: %s", ", ".join(f"{k_}={v:.2f}" for k_, v in results.items()))
    return {name: results[name] for name in METRICS}


def load_model(path, arch: str | None = None, *, allow_pickle: bool = False,
               timm_kwargs: dict | None = None) -> nn.Module:
    """A frozen encoder from a model file. ``arch`` and ``timm_kwargs`` (the geometry) apply to
    plain checkpoints; our exports carry their own geometry and it wins."""
    from tec.teacher import load_base_model

    return load_base_model(arch or "vit_base_patch16_224", Path(path), allow_pickle=allow_pickle,
                           plain_kwargs=timm_kwargs)


def evaluate_models(models: dict, train_shards: Any, test_shards: Any, cfg: EvalConfig, *,
                    metrics: Sequence[str] = ("knn", "linear"), arch: str | None = None,
                    allow_pickle: bool = False, timm_kwargs: dict | None = None,
                    loaded: dict | None = None) -> list[dict]:
    """Top-1 rows (percent) for each named model file (name -> path) on the same train/test
    images, with the settings of ``cfg`` (k-NN k / temperature, linear epochs / lr, limits,
    batch size, device).

    arch / timm_kwargs: the timm model and geometry of plain checkpoints (exports carry theirs).
    loaded: name -> the model of that file already loaded as :func:`load_model` would (the base
    model a command described once); evaluated from a copy instead of loading the file again.
    """
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, images = [], {}
    loaded = loaded or {}
    for name, path in models.items():
        model = copy.deepcopy(loaded[name]) if name in loaded else load_model(
            path, arch, allow_pickle=allow_pickle, timm_kwargs=timm_kwargs)
        size = model.patch_embed.img_size[0]
        if size not in images:
            images[size] = (load_eval_images(train_shards, size, limit=cfg.train_limit),
                            load_eval_images(test_shards, size, limit=cfg.test_limit))
        (tr_x, tr_y), (te_x, te_y) = images[size]
        train = extract_features(model, tr_x, tr_y, device=device, batch_size=cfg.batch_size)
        test = extract_features(model, te_x, te_y, device=device, batch_size=cfg.batch_size)
        row = {"model": name, "file": str(path)}
        for readout in ("cls", "mean"):
            if "knn" in metrics:
                row[f"knn_{readout}"] = knn_classify(
                    train[readout], train["labels"], test[readout], test["labels"],
                    k=cfg.knn_k, temperature=cfg.knn_temperature)
            if "linear" in metrics:
                row[f"linear_{readout}"] = linear_probe(
                    train[readout], train["labels"], test[readout], test["labels"],
                    epochs=cfg.linear_epochs, lr=cfg.linear_lr)
        log.info("evaluated %s: %s", name, {k: v for k, v in row.items() if k != "file"})
        rows.append(row)
    return rows


_HEADERS = {
    "model": "model",
    "knn_cls": "kNN cls",
    "knn_mean": "kNN mean",
    "linear_cls": "linear cls",
    "linear_mean": "linear mean",
    "finetune_top1": "fine-tune",  # shown only when a row has it (eval.finetune enabled)
}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, one line per row: ``model`` name then the four top-1 percents.

    A row is ``{'model': name, 'knn_cls': float, ...}``; missing metrics print as ``-``. A
    ``finetune_top1`` column (full fine-tuning top-1) follows when any row has that key.
    """
    columns = [c for c in _HEADERS
               if c != "finetune_top1" or any("finetune_top1" in row for row in rows)]
    cells = [[_HEADERS[c] for c in columns]]
    for row in rows:
        line = [str(row.get("model", row.get("name", "?")))]
        for metric in columns[1:]:
            value = row.get(metric)
            line.append("-" if value is None else f"{float(value):.2f}")
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(cells[0]), rule, *(render(r) for r in cells[1:])])


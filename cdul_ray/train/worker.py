"""The per-worker training loop of gradient alignment (paper §3.2; method.md §6), run by Ray Train's TorchTrainer.

No worker holds the latent labels of the whole corpus. The labels travel with the images: the training dataset is
the decoded images zipped with the newest complete label version (:mod:`cdul_ray.train.label_source`), re-read by
Ray Data at the start of every epoch, so each batch carries its images' labels of the previous epoch. Each epoch is
a sequence of named steps over one :class:`WorkerContext`:

1. :func:`train_epoch`: network steps on this worker's shard (``soft_target_loss``) on the labels that came with each
   batch (checked: version e − 1, the batch's own rows); in label-update epochs they move along the loss gradient
   (``label_step``, method.md §6). Every row received, updated or not (an image that failed to decode keeps its
   label), is streamed into ``labels/v{e:04d}/part-{rank:05d}.parquet`` a row group at a time.
2. Scalar reductions only: loss sum, images trained on, summed label change (3 numbers); the decode errors of the
   first epoch of an attempt are gathered to rank 0.
3. :func:`record_epoch` (rank 0): :func:`~cdul_ray.train.labels.complete_version` checks that no row was written
   twice, carries over the rows no worker received (``streaming_split(equal=True)`` drops up to world − 1 rows an
   epoch) from version e − 1 and writes ``_complete.json``, which lets the next epoch's read take the version; then
   decode errors, held-out mAP, label mAP against the ground truth (one block of classes at a time),
   ``history.csv``, CAMs.
4. :func:`report_checkpoint`: ``ray.train.report`` with the model, optimizer and state (resume point); the final
   epoch also exports ``<output>/model``.

Only rank 0 holds anything of size N: the ``row`` column of a version (exactness check), the sparse ground truth of
the training images (label mAP) and the held-out targets.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cdul_ray import schema, storage
from cdul_ray.classifier import Classifier, create_classifier, model_input, save_model_dir
from cdul_ray.train.cam import cam_inputs, write_cams
from cdul_ray.train.config import TrainConfig
from cdul_ray.train.labels import GroundTruth, VersionPartWriter, complete_version, history_csv, \
    version_label_map, version_uri, versions_after

logger = logging.getLogger(__name__)

# Test-only crash hook: the rank-0 worker raises after reporting the checkpoint of this epoch (when it trained that
# epoch itself), so tests can kill a run after an epoch and check that a resubmission resumes. Not for production.
CRASH_ENV = "CDUL_TEST_CRASH_AFTER_EPOCH"

ErrorRow = tuple[str, str, str, str]  # image_id, uri, stage, reason (schema.ERRORS_SCHEMA)


@dataclass
class WorkerInputs:
    """What the driver (``cdul_ray.train.job.run_training``) ships to every worker; large arrays as object refs."""

    cfg: TrainConfig
    classes: list[str]
    meta: dict[str, Any]  # model.json of the classifier: backbone, classes, image_size, loss, mean, std, ...
    num_rows: int  # N, the training images (rows 0..N-1 of the training order)
    train_truth: Any  # ObjectRef of the training images' GroundTruth (sparse), or None; fetched by rank 0 only
    eval_targets: Any  # ObjectRef of [M, C] uint8 ground truth of eval_split, or None; fetched by rank 0 only
    init_state: Any  # ObjectRef of the initial state dict (same head init on every worker)
    has_eval: bool
    cam: list[dict[str, Any]]  # image_id, uri, gt of the CAM images
    crash_after_epoch: int | None = None

    def loop_config(self) -> dict[str, Any]:
        """``train_loop_config`` of the TorchTrainer (Ray passes a dict to ``train_loop_per_worker``)."""
        return {"inputs": self}


@dataclass
class WorkerContext:
    """Everything one worker's epochs read and update."""

    cfg: TrainConfig
    classes: list[str]
    meta: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    num_rows: int  # N
    train_truth: GroundTruth | None  # rank 0
    eval_targets: np.ndarray | None  # (M, C), rank 0
    model: Classifier  # unwrapped (rank 0 evaluates and checkpoints it)
    ddp: nn.Module  # the model as prepared by Ray Train (DDP when world > 1)
    optimizer: torch.optim.Optimizer
    comm: "Collectives"
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    cam_inputs: list[dict[str, Any]] = field(default_factory=list)
    train_shard: Any = None
    eval_shard: Any = None
    collate: Any = None
    crash_after_epoch: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.cfg.batch_size // self.world)


@dataclass
class EpochResult:
    """One worker's share of an epoch."""

    update: bool  # a label-update epoch
    totals: torch.Tensor  # (3,) float64: sum of per-image losses, images trained on, sum of |Y_e - Y_{e-1}|
    rows: int  # label rows this worker wrote into the version
    errors: list[ErrorRow]
    seconds_start: float


class Collectives:
    """torch.distributed helpers that also work for one process (no-ops) and on NCCL (device tensors)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device if self.on and dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return t
        x = t.to(self.device)
        self.dist.all_reduce(x)
        return x.cpu()

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def gather_to_all(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, obj)
        return out


def collate_fn():
    """A Ray Data collate function (numpy batch -> tensors + the string columns); built in the worker. Training batches
    also carry their latent labels (``latent_label`` [B, C] and the label side's row, version and image id)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    from cdul_ray.train.label_source import LABEL_IMAGE_ID, LABEL_ROW, LABEL_VERSION, LATENT_LABEL

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            stage = np.asarray(batch["error_stage"], dtype=object)
            out = {
                "pixels": torch.from_numpy(np.array(batch["pixels"], dtype=np.uint8)),  # (B, 3, S, S), a copy
                "row": torch.from_numpy(np.array(batch["row"], dtype=np.int64)),  # (B,)
                "ok": torch.from_numpy(stage == ""),  # (B,) bool
                "image_id": [str(x) for x in batch["image_id"]],
                "uri": [str(x) for x in batch["uri"]],
                "error_stage": [str(x) for x in stage],
                "error_reason": [str(x) for x in batch["error_reason"]],
            }
            if LATENT_LABEL in batch:
                out["latent_label"] = torch.from_numpy(np.array(batch[LATENT_LABEL], dtype=np.float32))  # (B, C)
                out["label_row"] = torch.from_numpy(np.array(batch[LABEL_ROW], dtype=np.int64))  # (B,)
                out["label_version"] = torch.from_numpy(np.array(batch[LABEL_VERSION], dtype=np.int64))  # (B,)
                out["label_image_id"] = [str(x) for x in batch[LABEL_IMAGE_ID]]
            return out

    return _Collate()


def check_batch_labels(batch: dict[str, Any], epoch: int) -> None:
    """The labels of a batch must be those of its own images, from version ``epoch - 1``.

    Raises:
        RuntimeError: labels of other rows or of another version reached this batch.
    """
    rows, label_rows = batch["row"].tolist(), batch["label_row"].tolist()
    pairs = list(zip(rows, batch["image_id"], label_rows, batch["label_image_id"]))
    bad = [p for p in pairs if p[0] != p[2] or p[1] != p[3]]
    if bad:
        raise RuntimeError(f"epoch {epoch}: a batch carries the labels of other images ({len(bad)} of {len(pairs)} "
                           f"rows; first: image row {bad[0][0]} {bad[0][1]!r}, label row {bad[0][2]} {bad[0][3]!r})")
    wrong = batch["label_version"] != epoch - 1
    if bool(wrong.any()):
        raise RuntimeError(f"epoch {epoch}: a batch carries labels of version {int(batch['label_version'][wrong][0])}, "
                           f"expected version {epoch - 1} (the labels after the previous epoch)")


def flip_mask(image_ids: list[str], seed: int, epoch: int) -> torch.Tensor:
    """Deterministic per-image, per-epoch coin flips (independent of the worker count). Returns [B] bool."""
    return torch.tensor([zlib.crc32(f"{seed}:{epoch}:{i}".encode()) & 1 == 1 for i in image_ids], dtype=torch.bool)


def batch_errors(batch: dict[str, Any]) -> list[ErrorRow]:
    """The rows of a collated batch whose image failed to read or decode."""
    return [(i, u, s, r) for i, u, s, r, good in zip(batch["image_id"], batch["uri"], batch["error_stage"],
                                                     batch["error_reason"], batch["ok"].tolist()) if not good]


# --------------------------------------------------------------------------------------------------------------------
# Set-up


def _seed(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _restore(checkpoint, model: Classifier, rank: int) -> tuple[int, int, list[dict[str, Any]], Any]:
    """(epoch, label version, history, optimizer state) of a Ray Train checkpoint; the model weights are loaded."""
    with checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(os.path.join(folder, schema.MODEL_WEIGHTS), map_location="cpu",
                                         weights_only=True))
        opt_state = torch.load(os.path.join(folder, schema.OPTIMIZER_STATE), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, schema.TRAIN_STATE)) as f:
            state = json.load(f)
    logger.info("rank %d: resuming after epoch %d (label version %d)", rank, state["epoch"], state["label_version"])
    return state["epoch"], state["label_version"], state["history"], opt_state


def _initial_history(ctx: WorkerContext) -> list[dict[str, Any]]:
    """History row of epoch 0 (rank 0): the mAP of the initial labels, read back from ``labels/v0000``."""
    label_map = version_label_map(ctx.cfg.output, 0, ctx.train_truth, ctx.cfg.s3_endpoint) \
        if ctx.train_truth is not None else float("nan")
    return [{"epoch": 0, "label_version": 0, "label_updated": 0, "train_loss": float("nan"),
             "eval_map": float("nan"), "label_map": label_map, "label_change": 0.0, "images": 0, "seconds": 0.0}]


def setup(inputs: WorkerInputs) -> WorkerContext:
    """Build this worker's context: the model (from the initial state or the latest checkpoint), the optimizer and,
    on rank 0, the ground truth, the history and the CAM images. Rank 0 deletes label versions newer than the
    checkpoint (written by an attempt that crashed) before any worker reads labels."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = inputs.cfg
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    _seed(cfg)
    model = create_classifier(cfg.backbone, len(inputs.classes), freeze_backbone=cfg.freeze_backbone)
    model.load_state_dict(ray.get(inputs.init_state))
    if cfg.use_gpu == "true" and world > 1 and not cfg.freeze_backbone:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    start_epoch, version, history, opt_state = 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, version, history, opt_state = _restore(checkpoint, model, rank)
    ddp = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)  # after the move: state tensors follow the parameters' device
    ctx = WorkerContext(
        cfg=cfg, classes=inputs.classes, meta=inputs.meta, rank=rank, world=world, device=device,
        num_rows=inputs.num_rows, train_truth=ray.get(inputs.train_truth) if rank == 0 else None,
        eval_targets=ray.get(inputs.eval_targets) if rank == 0 else None, model=model, ddp=ddp,
        optimizer=optimizer, comm=Collectives(device), start_epoch=start_epoch,
        cam_inputs=cam_inputs(inputs.cam, cfg, cfg.s3_endpoint) if rank == 0 else [],
        train_shard=ray.train.get_dataset_shard("train"),
        eval_shard=ray.train.get_dataset_shard("eval") if inputs.has_eval else None,
        collate=collate_fn(), crash_after_epoch=inputs.crash_after_epoch,
    )
    if rank == 0:
        for stale in versions_after(cfg.output, version, cfg.s3_endpoint):  # written by an attempt that crashed
            storage.delete_dir(version_uri(cfg.output, stale), cfg.s3_endpoint)
        ctx.history = history or _initial_history(ctx)
    ctx.comm.barrier()
    return ctx


# --------------------------------------------------------------------------------------------------------------------
# The steps of an epoch


def train_epoch(ctx: WorkerContext, epoch: int) -> EpochResult:
    """Network steps over this worker's shard on the labels that came with each batch; label steps in label-update
    epochs (method.md §6). Every row received is written to this worker's part of version ``epoch``."""
    from cdul_ray.core.label_update import is_update_epoch, label_step, soft_target_loss

    cfg, device = ctx.cfg, ctx.device
    t0 = time.time()
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    update = is_update_epoch(epoch, cfg.label_update, cfg.label_warmup_epochs, cfg.label_update_every)
    ctx.ddp.train()
    totals = torch.zeros(3, dtype=torch.float64)
    errors: list[ErrorRow] = []
    part = VersionPartWriter(cfg.output, epoch, ctx.rank, ctx.num_classes, cfg.s3_endpoint)
    per_worker = ctx.per_worker_batch
    for batch in ctx.train_shard.iter_torch_batches(
        batch_size=per_worker, collate_fn=ctx.collate, local_shuffle_buffer_size=4 * per_worker,
        local_shuffle_seed=cfg.seed * 1000 + epoch,
    ):
        check_batch_labels(batch, epoch)
        ok = batch["ok"]  # (B,)
        errors += batch_errors(batch)
        labels = batch["latent_label"]  # (B, C), version epoch - 1
        x = model_input(batch["pixels"], ctx.meta, device)  # (B, 3, S, S)
        if cfg.hflip:
            flip = flip_mask(batch["image_id"], cfg.seed, epoch).to(device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        logits = ctx.ddp(x)  # (B, C)
        if bool(ok.any()):
            loss = soft_target_loss(logits[ok.to(device)], labels[ok].to(device), cfg.loss)
        else:  # every image of the batch failed to decode: keep DDP's collectives in step
            loss = logits.sum() * 0.0
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        k = int(ok.sum())
        new = labels  # (B, C): rows that failed to decode keep their label
        if update and k:
            new = labels.clone()
            new[ok] = label_step(labels[ok], logits[ok.to(device)].detach().float().cpu(), cfg.label_lr, cfg.loss,
                                 cfg.psi)
        totals += torch.tensor([loss.item() * k, k, float((new - labels).abs().sum())], dtype=torch.float64)
        part.add(batch["image_id"], batch["row"].numpy(), new.numpy())
    return EpochResult(update=update, totals=totals, rows=part.close(), errors=errors, seconds_start=t0)


def record_epoch(ctx: WorkerContext, epoch: int, result: EpochResult,
                 all_errors: list[list[ErrorRow]]) -> dict[str, Any]:
    """Rank 0, once every worker wrote its part: complete the version (exactness check, carried rows,
    ``_complete.json``), write decode errors, measure mAPs, append to ``history.csv``, write CAMs.

    Returns:
        The history row of the epoch (also the metrics reported to Ray Train).
    """
    cfg, endpoint = ctx.cfg, ctx.cfg.s3_endpoint
    carried = complete_version(cfg.output, epoch, ctx.num_rows, endpoint)  # raises if a row was written twice
    if all_errors and any(all_errors):
        storage.write_table(storage.join(cfg.output, schema.ERRORS_DIR, schema.TRAIN_DECODE_ERRORS_FILE),
                            schema.errors_table([e for part in all_errors for e in part]), endpoint)
    first = epoch == ctx.start_epoch + 1
    eval_map = evaluate(ctx, first) if ctx.eval_shard is not None else float("nan")
    label_map = version_label_map(cfg.output, epoch, ctx.train_truth, endpoint) if ctx.train_truth is not None \
        else float("nan")
    loss_sum, images, change = result.totals.tolist()
    row = {"epoch": epoch, "label_version": epoch, "label_updated": int(result.update),
           "train_loss": loss_sum / max(images, 1), "eval_map": eval_map, "label_map": label_map,
           "label_change": change / (ctx.num_rows * ctx.num_classes), "images": int(images),
           "seconds": time.time() - result.seconds_start}
    ctx.history.append(row)
    storage.write_bytes(storage.join(cfg.output, schema.HISTORY_FILE), history_csv(ctx.history).encode(), endpoint)
    write_cams(ctx.model, ctx.cam_inputs, ctx.meta, ctx.classes, cfg, epoch, ctx.device, endpoint)
    logger.info("epoch %d: loss %.4f, eval mAP %.2f, label mAP %.2f, labels %s (%d rows carried over)", epoch,
                row["train_loss"], eval_map, label_map, "updated" if result.update else "fixed", carried)
    return row


def report_checkpoint(ctx: WorkerContext, epoch: int, metrics: dict[str, Any]) -> None:
    """``ray.train.report`` of the epoch with rank 0's checkpoint (model, optimizer, model.json, state.json)."""
    import ray.train

    meta_now = {**ctx.meta, "epoch": epoch, "label_version": epoch}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.rank == 0:
            torch.save(ctx.model.state_dict(), os.path.join(folder, schema.MODEL_WEIGHTS))
            torch.save(ctx.optimizer.state_dict(), os.path.join(folder, schema.OPTIMIZER_STATE))
            with open(os.path.join(folder, schema.MODEL_META), "w") as f:
                json.dump(meta_now, f, indent=2)
            with open(os.path.join(folder, schema.TRAIN_STATE), "w") as f:
                json.dump({"epoch": epoch, "label_version": epoch, "history": ctx.history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=schema.checkpoint_dir_name(epoch))
    if ctx.rank == 0 and epoch == ctx.cfg.epochs:
        save_model_dir(storage.join(ctx.cfg.output, schema.MODEL_DIR), ctx.model, meta_now, ctx.cfg.s3_endpoint)


def train_worker(loop: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer; ``loop`` is ``WorkerInputs.loop_config()``."""
    ctx = setup(loop["inputs"])
    for epoch in range(ctx.start_epoch + 1, ctx.cfg.epochs + 1):
        result = train_epoch(ctx, epoch)
        # Collectives after every worker closed its part: rank 0 may then read the whole version.
        result.totals = ctx.comm.all_reduce_sum(result.totals)
        all_errors = ctx.comm.gather_to_all(result.errors) if epoch == ctx.start_epoch + 1 else []
        metrics: dict[str, Any] = {"epoch": epoch, "label_version": epoch, "start_epoch": ctx.start_epoch}
        if ctx.rank == 0:
            # Marks the version complete before rank 0 asks for the next epoch's data, which Ray Data starts only
            # when every worker asked (the split coordinator's barrier): the next read sees this version.
            metrics.update(record_epoch(ctx, epoch, result, all_errors))
        report_checkpoint(ctx, epoch, metrics)
        if ctx.crash_after_epoch is not None and epoch == ctx.crash_after_epoch and ctx.rank == 0:
            raise RuntimeError(f"{CRASH_ENV}={ctx.crash_after_epoch}: test crash after epoch {epoch}")


def evaluate(ctx: WorkerContext, first: bool) -> float:
    """Classifier mAP (%) on the whole held-out split (rank 0; the unwrapped model, no collectives); the split's
    decode errors are written on the first epoch of an attempt."""
    from cdul_ray.core.label_update import predict_proba
    from cdul_ray.core.metrics import mean_average_precision

    model, targets, cfg = ctx.model, ctx.eval_targets, ctx.cfg
    model.eval()
    probs = np.zeros(targets.shape, dtype=np.float32)  # (M, C)
    done = np.zeros(len(targets), dtype=bool)
    errors: list[ErrorRow] = []
    with torch.inference_mode():
        for batch in ctx.eval_shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=ctx.collate):
            ok = batch["ok"]
            errors += batch_errors(batch)
            if not bool(ok.any()):
                continue
            logits = model(model_input(batch["pixels"][ok], ctx.meta, ctx.device))  # (B', C)
            rows = batch["row"][ok].numpy()
            probs[rows] = predict_proba(logits, cfg.loss).float().cpu().numpy()
            done[rows] = True
    model.train()
    if first and errors:
        storage.write_table(storage.join(cfg.output, schema.ERRORS_DIR, schema.EVAL_DECODE_ERRORS_FILE),
                            schema.errors_table(errors), cfg.s3_endpoint)
    if not done.any():
        return float("nan")
    return mean_average_precision(probs[done], targets[done]).map

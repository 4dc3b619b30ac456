"""Training overhead benchmark (issue 11, 1d): a Ray Train 1-worker epoch vs a plain torch loop on the same images,
labels, model and config, and the extra cost of label-update epochs in both.

    .venv/bin/python bench/train_overhead.py --labels out/demo/labels-train --dataset data/synth \
        --output out/bench-train-overhead --limit 512 --epochs 4

Four runs, one after the other, in this process: plain loop with fixed labels, plain loop with label updates, then
``run_training`` (1 worker, 1 CPU, decoded images cached in the object store as the product does by default) with
``--no-label-update`` and ``--label-update``. The plain loop decodes and resizes every image once (the product's own
``decode_resized``) and keeps them in memory, then per epoch: seeded shuffle, batches, horizontal flips, forward,
``soft_target_loss``, AdamW step and, in update epochs, ``label_step``: the work of the Ray Train loop without Ray.
It runs at ``--threads`` torch threads (default 1: what a Ray Train worker reserving 1 CPU gets, OMP_NUM_THREADS=1).

Per-epoch seconds: the plain loop's own timer; Ray Train's from ``history.csv`` (``seconds``: the epoch's network and
label steps, the label version's write and rank 0's record, not the checkpoint report). Steady state = median over
epochs 2..E (epoch 1 has no label update, and Ray's first epoch also starts the data pipeline). The whole-run wall
time of each Ray run is printed as well. Targets (docs/performance.md): Ray Train epoch within 1.15x of the plain
loop; label updates add <= 10%.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from cdul_ray import storage
from cdul_ray.classifier import create_classifier, decode_resized, normalisation
from cdul_ray.core.label_update import is_update_epoch, label_step, soft_target_loss
from cdul_ray.core.views import normalize
from cdul_ray.train import TrainConfig, run_training
from cdul_ray.train.job import plan_training
from cdul_ray.train.labels import read_history


def plain_loop(cfg: TrainConfig, threads: int) -> dict:
    """The training loop without Ray on the images and Y0 that ``plan_training`` finds; per-epoch seconds."""
    torch.set_num_threads(threads)
    plan = plan_training(cfg)
    cfg, data = plan.cfg, plan.data
    t0 = time.perf_counter()
    uris = data.records["uri"].to_pylist()
    pixels = np.concatenate([decode_resized({"uri": np.array(uris[i:i + 64], dtype=object)}, cfg.image_size,
                                            plan.endpoint)["pixels"] for i in range(0, len(uris), 64)])
    pixels = torch.from_numpy(pixels)  # (N, 3, S, S) uint8
    decode_s = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = create_classifier(cfg.backbone, len(plan.classes), plan.weights, freeze_backbone=cfg.freeze_backbone)
    mean, std = normalisation(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    labels = torch.from_numpy(data.initial.copy())  # (N, C)
    n, seconds = len(uris), []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        update = is_update_epoch(epoch, cfg.label_update, cfg.label_warmup_epochs, cfg.label_update_every)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        model.train()
        new = labels.clone()
        for i in range(0, n, cfg.batch_size):
            rows = order[i:i + cfg.batch_size]
            x = normalize(pixels[rows], tuple(mean), tuple(std))  # (B, 3, S, S)
            if cfg.hflip:
                flip = torch.rand(len(rows), generator=gen) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            logits = model(x)  # (B, C)
            loss = soft_target_loss(logits, labels[rows], cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if update:
                new[rows] = label_step(labels[rows], logits.detach(), cfg.label_lr, cfg.loss, cfg.psi)
        labels = new
        seconds.append(time.perf_counter() - start)
    return {"decode_once_s": decode_s, "epoch_s": seconds}


def ray_train(cfg: TrainConfig) -> dict:
    start = time.perf_counter()
    summary = run_training(cfg)
    wall = time.perf_counter() - start
    history = read_history(summary.output)
    return {"wall_s": wall, "epoch_s": [float(r["seconds"]) for r in history if int(r["epoch"]) > 0]}


def train_worker_threads(cpus_per_worker: float) -> dict:
    """What a Ray Train worker of the product's shape (1 worker, ``resources_per_worker={"CPU": cpus}``) runs with:
    ``torch.get_num_threads()`` and ``OMP_NUM_THREADS`` inside the worker."""
    import os
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    def probe(config):  # written to a file: Ray Train 2.60's Result.metrics is None for a report without checkpoint
        with open(config["path"], "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(),
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}, f)

    out = tempfile.mkdtemp(prefix="thread-probe-")
    trainer = TorchTrainer(probe, train_loop_config={"path": os.path.join(out, "threads.json")},
                           scaling_config=ray.train.ScalingConfig(num_workers=1,
                                                                  resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=ray.train.RunConfig(storage_path=out))
    trainer.fit()
    with open(os.path.join(out, "threads.json")) as f:
        return json.load(f)


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", required=True, help="output directory of a labeling run")
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help="directory of the two Ray Train runs (replaced)")
    p.add_argument("--backbone", default="open_clip:cdul-synth-rn")
    p.add_argument("--pretrained-backbone", default="synth")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int, default=512, help="training images")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop")
    args = p.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = TrainConfig(labels=args.labels, dataset=args.dataset, output="", backbone=args.backbone,
                       pretrained_backbone=args.pretrained_backbone, image_size=args.image_size, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, limit=args.limit, cam_images=0, cache_decoded="true",
                       overwrite=True)
    results: dict[str, dict] = {}
    worker_threads = train_worker_threads(base.cpus_per_worker)
    for update in (False, True):
        name = "update" if update else "fixed"
        cfg = replace(base, label_update=update, output=storage.join(args.output, f"plain-{name}"))
        results[f"plain-{name}"] = plain_loop(cfg, args.threads)
        storage.delete_dir(storage.absolute_uri(cfg.output))
    for update in (False, True):
        name = "update" if update else "fixed"
        results[f"ray-{name}"] = ray_train(replace(base, label_update=update,
                                                   output=storage.join(args.output, f"ray-{name}")))
    ray.shutdown()

    s = {k: steady(v["epoch_s"]) for k, v in results.items()}
    print(f"\n{args.limit} images, {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs; steady epoch = median of epochs 2..{args.epochs}\n")
    print("| labels | plain loop s/epoch | Ray Train s/epoch | Ray / plain | Ray Train run wall s |")
    print("|---|---:|---:|---:|---:|")
    for name in ("fixed", "update"):
        print(f"| {name} | {s['plain-' + name]:.2f} | {s['ray-' + name]:.2f} | "
              f"{s['ray-' + name] / s['plain-' + name]:.2f} | {results['ray-' + name]['wall_s']:.1f} |")
    print(f"\nlabel-update epochs / fixed epochs: plain {s['plain-update'] / s['plain-fixed']:.3f}, "
          f"Ray Train {s['ray-update'] / s['ray-fixed']:.3f}")
    print(f"plain loop: {args.threads} torch threads; Ray Train worker ({base.cpus_per_worker:g} CPU): "
          f"{worker_threads['torch_threads']} torch threads, OMP_NUM_THREADS={worker_threads['omp_num_threads']}")
    print(json.dumps({"args": vars(args), "results": results, "steady_epoch_s": s,
                      "train_worker_threads": worker_threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

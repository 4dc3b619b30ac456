"""GPUs a Ray cluster has now and can have after autoscaling, and the actor pool sized from them.

On an autoscaling cluster (``cluster.yaml``: a CPU head, GPU workers with ``min_workers: 0``) the GPUs present at
submit time are often none; what matters is what the autoscaler can add. Ray itself reads that from the cluster
config's maximum resources (``ray._private.state.state.get_max_resources_from_cluster_config()``, used by Ray Train's
worker group and Ray Data's hash shuffle), which autoscalers that report their config to the GCS fill in (KubeRay,
newer Ray). Ray 2.60's own cluster launcher (``ray up``) reports nothing there; instead it leaves the autoscaler's
config on the head node as ``~/ray_bootstrap_config.yaml`` (the file Ray's usage stats and Ray Tune read), and a job
submitted with ``ray job submit`` runs its driver on the head. :func:`gpu_capacity` reads the GCS config first, that
file second, and falls back to the GPUs present now; both configs go through the same Ray helper
(``GlobalState._calculate_max_resource_from_cluster_config``), the file read with the autoscaler's own defaults.

:func:`plan_actor_pool` is plain Python: ``use_gpu`` (auto/true/false) and the pool bounds from a capacity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from cdul_ray.config import ConfigError

logger = logging.getLogger(__name__)

# Where `ray up` leaves the autoscaler's config on the head node (ray/autoscaler/_private/commands.py).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
NO_CONFIG = "no autoscaler config"


@dataclass(frozen=True)
class GpuCapacity:
    """GPUs of a Ray cluster, now and at most.

    Attributes:
        now: GPUs in the cluster now (``ray.cluster_resources()``), whole GPUs.
        max: GPUs the cluster can have at most once the autoscaler has added every node it may, present ones
            included; ``None`` when the config sets no upper bound (a node group with ``max_count: -1``).
            Equal to ``now`` when no autoscaler config is known.
        source: where ``max`` comes from: ``"cluster config (GCS)"``, the bootstrap config's path, or
            :data:`NO_CONFIG`.
        gpu_node_types: names of the node types that carry GPUs and may be launched (empty without a config).
    """

    now: int
    max: int | None
    source: str
    gpu_node_types: tuple[str, ...] = ()

    @property
    def addable(self) -> int | None:
        """GPUs the autoscaler can still add (``None``: no upper bound)."""
        return None if self.max is None else max(self.max - self.now, 0)


@dataclass(frozen=True)
class ActorPoolPlan:
    """Resources of a ``map_batches`` actor pool: one GPU per actor or none; ``ActorPoolStrategy`` bounds.

    ``max_actors`` is ``None`` when the cluster's GPUs have no upper bound (Ray Data then grows the pool with them).
    ``reason`` is the one-line explanation that gets logged, as a warning when ``warn`` (GPU actors on a cluster
    with no GPU and no known autoscaler config: the pool starts only if someone adds GPU nodes).
    """

    use_gpu: bool
    min_actors: int
    max_actors: int | None
    reason: str
    warn: bool = False


def plan_actor_pool(use_gpu: str, min_actors: int, max_actors: int | None, capacity: GpuCapacity) -> ActorPoolPlan:
    """Decide GPU or CPU actors and the pool bounds.

    ``auto`` picks GPU actors when the cluster has GPUs now or its autoscaler can add some; the default maximum pool
    size is then the most GPUs the cluster can have (one actor per GPU), and 1 for CPU actors. An explicit
    ``max_actors`` always wins; the maximum is never below ``min_actors``.

    Args:
        use_gpu: ``"auto"``, ``"true"`` or ``"false"`` (the ``--use-gpu`` flag).
        min_actors: minimum pool size (>= 1).
        max_actors: the ``--max-actors`` flag, or ``None`` for the default.
        capacity: the cluster's GPUs (:func:`gpu_capacity`).

    Raises:
        ConfigError: ``use_gpu`` is ``"true"`` but the autoscaler config says the cluster can never have a GPU
            (the actors would wait forever).
    """
    gpu, found = _gpu_choice(use_gpu, capacity)
    if gpu:
        default_max = None if capacity.max is None else max(capacity.max, capacity.now, 1)
    else:
        default_max = 1
    if max_actors is not None:
        pool_max = max_actors
    else:
        pool_max = None if default_max is None else max(default_max, min_actors)

    kind = "GPU actors (1 GPU each)" if gpu else "CPU actors"
    bounds = f"pool {min_actors}..{'unbounded' if pool_max is None else pool_max}"
    why = "" if max_actors is None else f" (--max-actors {max_actors})"
    reason = f"use_gpu={use_gpu}: {found} -> {kind}, {bounds}{why}"
    warn = gpu and capacity.now == 0 and capacity.source == NO_CONFIG
    if gpu and capacity.now == 0:
        reason += ("; the actors start once GPU nodes join (none may: no autoscaler config found)" if warn
                   else "; the actors wait for the autoscaler to start GPU nodes")
    return ActorPoolPlan(use_gpu=gpu, min_actors=min_actors, max_actors=pool_max, reason=reason, warn=warn)


def plan_train_workers(use_gpu: str, workers: int, capacity: GpuCapacity) -> tuple[bool, str]:
    """(one GPU per Ray Train worker, the reason logged) for ``--use-gpu`` auto/true/false and ``--workers``.

    ``auto`` trains on GPUs when the cluster has GPUs now or its autoscaler can add some (the rule of
    :func:`plan_actor_pool`); Ray Train's worker group then waits for the autoscaler to start the GPU nodes.

    Raises:
        ConfigError: ``use_gpu`` is true but the autoscaler config says the cluster can never have a GPU, or
            ``workers`` exceeds the most GPUs the cluster can have (the worker group would wait forever).
    """
    gpu, found = _gpu_choice(use_gpu, capacity)
    if gpu and capacity.source != NO_CONFIG and capacity.max is not None and workers > max(capacity.max, 1):
        raise ConfigError("workers", f"is {workers}, but each training worker takes one GPU and the cluster can have "
                                     f"at most {capacity.max} ({found}); use --workers {max(capacity.max, 1)}")
    what = f"{workers} training worker(s), 1 GPU each" if gpu else f"{workers} training worker(s) on CPUs"
    reason = f"use_gpu={use_gpu}: {found} -> {what}"
    if gpu and capacity.now == 0:
        reason += "; they start once GPU nodes join"
    return gpu, reason


def _gpu_choice(use_gpu: str, capacity: GpuCapacity) -> tuple[bool, str]:
    """(use GPUs, what was found, in words) for ``use_gpu`` auto/true/false; raises ConfigError as its callers say."""
    addable = capacity.addable
    has_gpus = capacity.now > 0 or addable is None or addable > 0
    gpu = {"true": True, "false": False}.get(use_gpu, has_gpus)
    if gpu and not has_gpus and capacity.source != NO_CONFIG:
        raise ConfigError("use_gpu", f"is true but the cluster has no GPU and its autoscaler config "
                                     f"({capacity.source}) has no node type with GPUs; use --use-gpu false or auto")
    types = f"node type {', '.join(capacity.gpu_node_types)}, " if capacity.gpu_node_types else ""
    if capacity.source == NO_CONFIG:
        found = f"{capacity.now} GPUs now, no autoscaler config found"
    else:
        up_to = "no upper bound" if addable is None else f"up to {addable}"
        found = f"{capacity.now} GPUs now, {up_to} addable by the autoscaler ({types}from {capacity.source})"
    return gpu, found


def gpu_capacity(bootstrap_config: str = BOOTSTRAP_CONFIG) -> GpuCapacity:
    """GPUs of the connected Ray cluster now, and at most after autoscaling.

    Reads, first that exists: the cluster config the autoscaler reported to the GCS; the autoscaler config file
    ``bootstrap_config`` (``ray up`` puts it in the head node's home); otherwise the GPUs present now are the
    maximum. An unreadable source is logged and skipped, never fatal. Requires ``ray.init()`` first.
    """
    import ray

    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # an internal Ray API: missing or changed in another Ray version
        logger.debug("cluster config from the GCS unavailable: %r", e)
        config = None
    if config is not None and config.node_group_configs:
        return capacity_from_cluster_config(config, now, "cluster config (GCS)")

    path = os.path.expanduser(bootstrap_config)
    if os.path.isfile(path):
        try:
            return capacity_from_cluster_config(cluster_config_from_file(path), now, bootstrap_config)
        except Exception as e:
            logger.warning("could not read the autoscaler config %s (%s); counting only the GPUs present now",
                           bootstrap_config, e)
    return GpuCapacity(now=now, max=now, source=NO_CONFIG)


def cluster_config_from_file(path: str):
    """An autoscaler config YAML (cluster launcher format) as Ray's ``autoscaler_pb2.ClusterConfig``.

    Read as Ray's autoscaler reads the bootstrap config ``ray up`` leaves on the head: ``available_node_types`` with
    the autoscaler's own defaults (``fill_node_type_min_max_workers``: a type's ``max_workers`` defaults to the
    global one, the head type's to 0); the head type counts as one node more. The global ``max_workers`` (worker
    nodes of all types together) caps each resource at head + ``max_workers`` × the most one worker type has.

    Raises:
        OSError, yaml.YAMLError: unreadable file. ValueError: not an autoscaler config.
    """
    import copy

    import yaml
    from ray.autoscaler._private.util import fill_node_type_min_max_workers
    from ray.core.generated import autoscaler_pb2

    with open(path) as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not raw.get("available_node_types") or "max_workers" not in raw:
        raise ValueError("no available_node_types or max_workers: not a cluster launcher config")
    config = copy.deepcopy(raw)
    types = config["available_node_types"]
    config.setdefault("head_node_type", next(iter(types)) if len(types) == 1 else None)
    types.get(config["head_node_type"], {}).setdefault("max_workers", 0)
    fill_node_type_min_max_workers(config)
    cluster = autoscaler_pb2.ClusterConfig()
    head: dict[str, int] = {}
    per_worker: dict[str, int] = {}
    for name, node_type in types.items():
        is_head = name == config["head_node_type"]
        group = cluster.node_group_configs.add()
        group.name = name
        group.min_count = int(node_type.get("min_workers", 0)) + is_head
        group.max_count = int(node_type.get("max_workers", 0)) + is_head
        for key, value in (node_type.get("resources") or {}).items():
            group.resources[key] = int(value)
            if is_head:
                head[key] = int(value)
            elif group.max_count:
                per_worker[key] = max(per_worker.get(key, 0), int(value))
    for key, value in per_worker.items():
        cluster.max_resources[key] = head.get(key, 0) + int(config["max_workers"]) * value
    return cluster


def capacity_from_cluster_config(config, now: int, source: str) -> GpuCapacity:
    """GPU capacity from a ``ClusterConfig`` proto, with Ray's own max-resource rule.

    Ray's rule (``GlobalState._calculate_max_resource_from_cluster_config``): sum of ``max_count`` × GPUs over node
    groups, capped by ``max_resources["GPU"]``; ``-1`` counts or amounts mean unbounded. The maximum is never below
    the GPUs present ``now`` (nodes started outside the config).
    """
    import sys

    from ray._private.state import GlobalState

    total = GlobalState._calculate_max_resource_from_cluster_config(config, "GPU")
    types = tuple(g.name or "unnamed" for g in config.node_group_configs
                  if g.resources.get("GPU", 0) != 0 and g.max_count != 0)
    if total is not None and total >= sys.maxsize:
        return GpuCapacity(now=now, max=None, source=source, gpu_node_types=types)
    return GpuCapacity(now=now, max=max(total or 0, now), source=source, gpu_node_types=types)


def actor_pool(cfg: Any) -> tuple[bool, int, int | None]:
    """(use GPU, min actors, max actors or None for unbounded) of a model actor pool from a stage config's
    ``use_gpu``, ``min_actors`` and ``max_actors`` and the cluster's GPUs, present or addable by the autoscaler; logs
    what was decided and why.

    Raises:
        ConfigError: ``use_gpu`` is true on a cluster whose autoscaler config has no GPU node type.
    """
    import ray

    capacity = gpu_capacity()
    plan = plan_actor_pool(cfg.use_gpu, cfg.min_actors, cfg.max_actors, capacity)
    logger.log(logging.WARNING if plan.warn else logging.INFO, "%s", plan.reason)
    max_actors = plan.max_actors
    if not plan.use_gpu and capacity.source == NO_CONFIG:  # a fixed cluster: its CPUs now are all it will have
        max_actors = fit_cpu_pool(plan.min_actors, plan.max_actors, cfg.cpus_per_actor,
                                  ray.cluster_resources().get("CPU", 0))
    return plan.use_gpu, plan.min_actors, max_actors


def fit_cpu_pool(min_actors: int, max_actors: int | None, cpus_per_actor: float, cluster_cpus: float) -> int:
    """The most CPU actors that still leave the CPUs of one decode task free; without them no image is decoded and
    the job waits forever (measured: 2 actors of 1 CPU on a 2-CPU machine never labeled an image).

    Returns ``max_actors`` capped to that room (logged when capped).

    Raises:
        ConfigError: (field ``min_actors``) even ``min_actors`` leave no room.
    """
    decode = decode_cpus(cpus_per_actor)
    room = int((cluster_cpus - decode) // cpus_per_actor)
    if min_actors > room:
        raise ConfigError("min_actors", f"is {min_actors}, but {min_actors} CPU actors of {cpus_per_actor:g} CPU "
                                        f"leave no {decode:g} CPU for the decode tasks on this {cluster_cpus:g}-CPU "
                                        f"cluster, so no image would ever be decoded; use at most {max(room, 0)} (or "
                                        "lower --cpus-per-actor)")
    if max_actors is None or max_actors > room:
        logger.info("CPU actor pool capped at %d: %g CPUs, %g per actor, %g kept for decode tasks", room,
                    cluster_cpus, cpus_per_actor, decode)
        return room
    return max_actors


def decode_cpus(cpus_per_actor: float) -> float:
    """CPUs reserved per decode task: 0.5, or 0.25 when the CLIP actor reserves 0.5.

    It differs from the CLIP actor's reservation on purpose: Ray Data fuses adjacent map stages with equal resources
    (``ray/data/_internal/logical/rules/operator_fusion.py``; ray-project/ray#54433), which would run decoding inside
    the CLIP actor, in series with CLIP (docs/performance.md measures the difference). GPU actors never fuse with it.
    """
    return 0.25 if cpus_per_actor == 0.5 else 0.5


# Auto ``decode_batch_size``: decode blocks of about this many bytes, within these bounds (docs/performance.md:
# on the bundled CLIP, 2 CPUs, 16-image blocks ran at half the speed of 64-256: Ray's per-task cost, not the work).
DECODE_BLOCK_BYTES = 32 << 20
DECODE_ROWS = (16, 256)
DECODED_IMAGE_BYTES = 1 << 20  # device views ship the decoded image: its size is unknown before reading (640x480 RGB)


def decode_batch_rows(requested: int | None, bytes_per_image: int) -> int:
    """Images per decode task (and per block into the model actors) of labeling and prediction.

    Args:
        requested: ``--decode-batch-size``; taken as is when set.
        bytes_per_image: what a decode task ships per image (``label_block_bytes``; 3 × S² for prediction).

    Returns:
        ``requested``, else the images that fill about ``DECODE_BLOCK_BYTES`` (32 MiB), within 16-256.
    """
    if requested is not None:
        return requested
    return max(DECODE_ROWS[0], min(DECODE_ROWS[1], DECODE_BLOCK_BYTES // max(1, bytes_per_image)))


def label_block_bytes(views: str, view_size: int | tuple[int, int], grid: int) -> int:
    """Bytes a labeling decode task ships per image: 1 + K² uint8 views of ``view_size`` (``exact``: 123 KB for the
    bundled CLIP at 64 px, 1.5 MB for ViT-B at 224 px, 6 MB for RN50x64 at 448 px), or the decoded image (``device``:
    unknown before reading, ``DECODED_IMAGE_BYTES``)."""
    if views != "exact":
        return DECODED_IMAGE_BYTES
    h, w = (view_size, view_size) if isinstance(view_size, int) else view_size
    return (1 + grid * grid) * 3 * h * w


def cpu_threads(requested: int, node_cpus: int, actors: int) -> int:
    """torch intra-op threads of a CPU CLIP actor.

    Ray sets ``OMP_NUM_THREADS`` to the actor's reserved CPUs (1 by default), which leaves the other cores of a CPU
    node idle while CLIP, the bottleneck, runs. ``requested`` > 0 is taken as is; 0 means the node's cores shared by
    the CLIP actors that can land on it (at most ``actors``), at least 1.
    """
    if requested > 0:
        return requested
    return max(1, node_cpus // max(1, min(actors, node_cpus)))


def wait_for_free_cpu(timeout_s: float = 30.0) -> None:
    """Wait (at most ``timeout_s`` seconds) until the cluster reports a free CPU before a Dataset execution starts.

    The actors and tasks of a previous execution (a labeling actor pool, a training's worker group) hand their CPUs
    back a moment after it returns, several seconds on a loaded machine; Ray Data checks ``ray.available_resources()``
    when an execution starts and, seeing no CPU, warns that "The Dataset job will hang". After the timeout the
    execution starts anyway (and Ray's warning, then meant, is printed).
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.1)

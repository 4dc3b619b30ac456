"""Ray wiring of the labeling stages that decides its speed: decode tasks apart from the CLIP actor, actor threads."""

from __future__ import annotations

import numpy as np
import pytest

from cdul_ray.config import ConfigError, LabelConfig
from cdul_ray.resources import DECODE_BLOCK_BYTES, cpu_threads, decode_batch_rows, decode_cpus, label_block_bytes


def test_cpu_threads_share_the_node_between_clip_actors():
    assert cpu_threads(0, node_cpus=16, actors=1) == 16
    assert cpu_threads(0, node_cpus=16, actors=4) == 4
    assert cpu_threads(0, node_cpus=2, actors=8) == 1  # more actors than cores: one thread each
    assert cpu_threads(3, node_cpus=16, actors=1) == 3  # asked for: taken as is


def test_decode_reservation_never_equals_the_actors():
    for cpus in (0.25, 0.5, 1.0, 2.0):
        assert decode_cpus(cpus) != cpus


def test_decode_blocks_hold_about_32_mib_within_16_to_256_images():
    def rows(views, size, grid, requested=None):
        return decode_batch_rows(requested, label_block_bytes(views, size, grid))

    assert rows("exact", 64, 3) == 256  # bundled CLIP: 123 KB of views per image, capped
    assert rows("exact", 224, 3) == 22  # ViT-B: 1.5 MB per image
    assert rows("exact", (224, 224), 3) == 22
    k2 = rows("exact", 224, 2)  # 5 views: twice the images of K = 3
    assert k2 == 44 and k2 * 5 * 3 * 224 * 224 <= DECODE_BLOCK_BYTES < (k2 + 1) * 5 * 3 * 224 * 224
    assert rows("exact", 448, 3) == 16  # RN50x64: never below 16
    assert rows("device", 448, 3) == 32  # one decoded image shipped, nominal 1 MiB
    assert rows("exact", 64, 3, requested=7) == 7  # asked for: taken as is
    assert decode_batch_rows(None, 3 * 224 * 224) == 222  # prediction: one resized image


def test_smoke_test_shrinks_the_decode_blocks():
    assert LabelConfig(smoke_test=True).effective().decode_batch_size == 4
    assert LabelConfig(smoke_test=True, decode_batch_size=2).effective().decode_batch_size == 2
    with pytest.raises(ConfigError, match="`decode_batch_size`"):  # 0 stays refused under --smoke-test too
        LabelConfig(smoke_test=True, decode_batch_size=0).effective().validate()


def test_smoke_test_keeps_a_bad_limit_bad():
    assert LabelConfig(smoke_test=True).effective().limit == 8
    assert LabelConfig(smoke_test=True, limit=3).effective().limit == 3
    with pytest.raises(ConfigError, match="`limit`"):  # was silently turned into 8
        LabelConfig(smoke_test=True, limit=0).effective().validate()


@pytest.mark.parametrize("field, value", [("views", "gpu"), ("cpu_threads", -1), ("decode_batch_size", 0)])
def test_bad_speed_flags_fail_fast_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        LabelConfig(dataset="d", output="o", **{field: value}).validate()


class _Identity:
    def __call__(self, batch):
        return batch


def _decode(batch):
    return {"id": batch["id"] * 2}


def test_decode_stage_is_not_fused_into_the_clip_actor(ray_cluster):
    """With equal CPU reservations Ray Data fuses the two stages (decoding would run in series with CLIP)."""
    ray = ray_cluster

    def plan(decode_num_cpus: float) -> str:
        ds = ray.data.range(8, override_num_blocks=2).map_batches(_decode, num_cpus=decode_num_cpus)
        ds = ds.map_batches(_Identity, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1.0)
        out = ds.materialize()
        assert sorted(r["id"] for r in out.take_all()) == list(range(0, 16, 2))
        return out.stats()

    assert "MapBatches(_decode)->MapBatches(_Identity)" in plan(1.0)  # what Ray does with equal reservations
    stats = plan(decode_cpus(1.0))
    assert "MapBatches(_decode)->MapBatches(_Identity)" not in stats
    assert "MapBatches(_decode)" in stats and "MapBatches(_Identity)" in stats

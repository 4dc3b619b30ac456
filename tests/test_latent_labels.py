"""Latent label versions on storage (cdul_ray.train.labels) and their Ray Data source (cdul_ray.train.label_source):
row-group writes, range reads, the rank-0 exactness check and carry-over, the per-batch version check, the label mAP
computed a block of classes at a time."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdul_ray import schema
from cdul_ray.core.metrics import mean_average_precision, multi_hot
from cdul_ray.train import labels as L

N, C = 50, 5


def _ids(rows) -> list[str]:
    return [f"img{r:03d}" for r in rows]


def _values(rows, version: int) -> np.ndarray:
    """Label values that encode row and version: [n, C]."""
    rows = np.asarray(rows)
    return ((rows[:, None] * C + np.arange(C)) % 97 / 100.0 + 0.001 * version).astype(np.float32)


def _write_worker_parts(out, version: int, shards: list[list[int]], group_rows: int = 4) -> None:
    for rank, rows in enumerate(shards):
        writer = L.VersionPartWriter(str(out), version, rank, C)
        writer.group_rows = group_rows
        rng = np.random.default_rng(rank)
        order = rng.permutation(rows)  # a worker receives its rows in any order
        for chunk in np.array_split(order, max(1, len(order) // 3)):
            writer.add(_ids(chunk), chunk, _values(chunk, version))
        assert writer.close() == len(rows)


@pytest.fixture
def v0(tmp_path):
    L.write_initial_version(str(tmp_path), _ids(range(N)), _values(np.arange(N), 0))
    return tmp_path


def test_initial_version_is_complete_and_in_row_order(v0):
    assert L.newest_complete_version(str(v0)) == (0, N)
    table = L.read_label_version(str(v0), 0)
    assert table.schema.equals(schema.LATENT_LABELS_SCHEMA, check_metadata=False)
    assert table["row"].to_pylist() == list(range(N)) and table["image_id"].to_pylist() == _ids(range(N))
    np.testing.assert_array_equal(L.label_values(table, C), _values(np.arange(N), 0))


def test_worker_parts_are_sorted_row_groups_and_range_reads_are_exact(v0):
    shards = [list(range(0, N, 2)), list(range(1, N, 2))]
    _write_worker_parts(v0, 1, shards)
    for rank, rows in enumerate(shards):
        meta = pq.ParquetFile(v0 / "labels" / "v0001" / schema.worker_labels_file(rank)).metadata
        assert meta.num_row_groups > 1 and meta.num_rows == len(rows)
        for g in range(meta.num_row_groups):  # each row group sorted by row
            column = pq.ParquetFile(v0 / "labels" / "v0001" / schema.worker_labels_file(rank)).read_row_group(g)
            assert column["row"].to_pylist() == sorted(column["row"].to_pylist())
    for lo, hi in [(0, N), (7, 8), (10, 31), (49, 50)]:
        table = L.read_version_range(str(v0), 1, lo, hi)
        assert table["row"].to_pylist() == list(range(lo, hi))
        assert set(table["version"].to_pylist()) == {1}
        np.testing.assert_array_equal(L.label_values(table, C), _values(np.arange(lo, hi), 1))
    assert L.newest_complete_version(str(v0)) == (0, N)  # parts alone do not complete a version


def test_complete_version_carries_rows_no_worker_wrote_and_marks_the_version(v0):
    missing = [3, 17, 48]
    _write_worker_parts(v0, 1, [[r for r in range(N) if r % 2 == 0 and r not in missing],
                                [r for r in range(N) if r % 2 == 1 and r not in missing]])
    assert L.complete_version(str(v0), 1, N) == len(missing)
    assert L.newest_complete_version(str(v0)) == (1, N)
    carry = pq.read_table(v0 / "labels" / "v0001" / schema.CARRY_LABELS_FILE)
    assert carry["row"].to_pylist() == missing and set(carry["version"].to_pylist()) == {1}
    np.testing.assert_array_equal(L.label_values(carry, C), _values(np.array(missing), 0))  # the previous labels
    table = L.read_version_range(str(v0), 1, 0, N)  # every row exactly once, one schema
    assert table["row"].to_pylist() == list(range(N))


def test_complete_version_refuses_a_row_written_twice(v0):
    _write_worker_parts(v0, 1, [list(range(0, 30)), list(range(25, N))])
    with pytest.raises(RuntimeError, match="5 images written by several workers"):
        L.complete_version(str(v0), 1, N)
    assert L.newest_complete_version(str(v0)) == (0, N)
    with pytest.raises(RuntimeError, match=r"rows \[20, 30\) are not each there exactly once"):
        L.read_version_range(str(v0), 1, 20, 30)


def test_complete_version_refuses_rows_outside_the_training_set(v0):
    _write_worker_parts(v0, 1, [list(range(N + 2))])
    with pytest.raises(RuntimeError, match="outside"):
        L.complete_version(str(v0), 1, N)


def test_newest_complete_version_skips_an_incomplete_newer_one(v0):
    _write_worker_parts(v0, 1, [list(range(N))])
    L.complete_version(str(v0), 1, N)
    _write_worker_parts(v0, 2, [list(range(N // 2))])  # a crashed epoch 2
    assert L.newest_complete_version(str(v0)) == (1, N)
    assert L.versions_after(str(v0), 1) == [2]


def test_label_map_by_blocks_of_classes_equals_the_dense_map(v0):
    rng = np.random.default_rng(0)
    gt = [sorted(rng.choice(C, size=rng.integers(0, 3), replace=False).tolist()) for _ in range(N)]
    truth = L.GroundTruth.from_lists(gt, C)
    np.testing.assert_array_equal(truth.dense(0, C), multi_hot(gt, C))
    np.testing.assert_array_equal(truth.dense(1, 3), multi_hot(gt, C)[:, 1:3])
    expected = mean_average_precision(_values(np.arange(N), 0), multi_hot(gt, C)).map
    assert L.version_label_map(str(v0), 0, truth) == pytest.approx(expected)
    assert L.version_label_map(str(v0), 0, truth, budget_bytes=8 * N * 2) == pytest.approx(expected)  # 3 blocks


def test_batches_with_labels_of_another_version_or_other_rows_fail_loudly():
    from cdul_ray.train.worker import check_batch_labels

    batch = {"row": torch.tensor([4, 9]), "image_id": ["a", "b"], "label_row": torch.tensor([4, 9]),
             "label_image_id": ["a", "b"], "label_version": torch.tensor([2, 2])}
    check_batch_labels(batch, 3)
    with pytest.raises(RuntimeError, match="version 2, expected version 3"):
        check_batch_labels(batch, 4)
    with pytest.raises(RuntimeError, match="labels of other images"):
        check_batch_labels({**batch, "label_row": torch.tensor([4, 8])}, 3)
    with pytest.raises(RuntimeError, match="labels of other images"):
        check_batch_labels({**batch, "label_image_id": ["a", "c"]}, 3)


def test_label_source_reads_the_newest_complete_version_when_its_read_tasks_are_made(v0):
    from ray.data.block import BlockAccessor

    from cdul_ray.train.label_source import LABEL_ROW, LABEL_VERSION, LATENT_LABEL, LatentLabelSource

    source = LatentLabelSource(str(v0), N, C, rows_per_task=16)
    _write_worker_parts(v0, 1, [list(range(N))])
    L.complete_version(str(v0), 1, N)  # completed after the source was made: its next read takes it
    tasks = source.get_read_tasks(1)
    assert [t.metadata.num_rows for t in tasks] == [16, 16, 16, 2]
    blocks = [b for t in tasks for b in t()]
    rows = np.concatenate([b[LABEL_ROW].to_numpy() for b in blocks])
    assert rows.tolist() == list(range(N))
    assert {v for b in blocks for v in b[LABEL_VERSION].to_pylist()} == {1}
    values = np.concatenate([BlockAccessor.for_block(b).to_numpy(LATENT_LABEL) for b in blocks])  # (N, C)
    np.testing.assert_array_equal(values, _values(np.arange(N), 1))
    with pytest.raises(RuntimeError, match="rows"):
        LatentLabelSource(str(v0), N + 1, C).get_read_tasks(1)


@pytest.mark.slow
def test_every_execution_of_the_zipped_dataset_reads_the_version_complete_at_its_start(ray_cluster, v0):
    import ray.data

    from cdul_ray.train.label_source import latent_label_dataset

    images = ray.data.from_items([{"row": r} for r in range(N)])
    ds = images.zip(latent_label_dataset(str(v0), N, C, rows_per_task=16))
    first = ds.take_all()
    assert [r["label_row"] for r in first] == list(range(N)) and {r["label_version"] for r in first} == {0}
    _write_worker_parts(v0, 1, [list(range(N))])
    L.complete_version(str(v0), 1, N)
    second = ds.take_all()  # the same Dataset object, executed again
    assert [r["row"] for r in second] == [r["label_row"] for r in second] == list(range(N))
    assert {r["label_version"] for r in second} == {1}
    np.testing.assert_array_equal(np.stack([r["latent_label"] for r in second]), _values(np.arange(N), 1))

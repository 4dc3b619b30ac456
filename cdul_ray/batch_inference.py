"""The one batch-inference skeleton of labeling and prediction: streamed, resumable, exactly-once Parquet output.

Plan (a single Ray Data read -> map -> write, the shape Ray Data checkpointing needs)::

    <output>/_index/*.parquet       what this run still has to do: the corpus index (image_id, uri, gt_labels) less
                                    the ids committed by earlier runs; rewritten each run
      -> read_parquet
      -> map_batches(decode stage)                  CPU tasks: bytes -> pixels, error rows for unreadable images
      -> map_batches(model actor, ActorPoolStrategy) GPU/CPU actors: pixels -> scores (+ error_stage/error_reason)
      -> ResultDatasink                              one file per write task, split into <results>/ and errors/
    <output>/_checkpoint/*.parquet  Ray's checkpoint: the image ids of every committed write task

Guarantees (Ray Data checkpointing, ``ray.data.checkpoint``, beta in Ray 2.60; read its source for details):

- *Streaming*: rows reach storage while the job runs (no ``materialize()``); a write task buffers at least
  ``rows_per_file`` rows, so that is what a kill can lose.
- *Exactly once*: each write task first writes a *pending* checkpoint (its image ids) named after its data file, then
  the data files, then renames the checkpoint to committed (Ray's two-phase commit for file sinks). A run that starts
  skips every committed id, and finds the pending checkpoints of a killed run and deletes their data files in
  ``<results>/`` and ``errors/`` (``ResultCheckpointManager``). Every image therefore ends exactly once in
  ``<results>/`` or ``errors/``, given unique ``image_id`` values (the dataset readers check them).
- *Incremental*: the checkpoint is kept after success, so a later run over a grown corpus labels only new ids.

Errors: an unreadable image is an error row (``errors/``), never a failed job.
"""

from __future__ import annotations

import logging
import posixpath
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector, FileType

from cdul_ray import schema, storage
from cdul_ray.resources import wait_for_free_cpu

logger = logging.getLogger(__name__)

ERROR_COLUMNS = ("error_stage", "error_reason")  # added by every stage; "" when the row is fine
ID_COLUMN = "image_id"


class OutputExistsError(FileExistsError):
    """The output location holds something this run must not write into (labeling, prediction and training).

    The message is prefixed with the ``output`` field's name as every config error names it.
    """

    def __init__(self, message: str):
        from cdul_ray.config import field_prefix

        super().__init__(f"{field_prefix('output')}: {message}")


# --------------------------------------------------------------------------------------------------------------------
# Output directory: fresh, resumed, or refused


def prepare_output(output: str, endpoint: str | None, overwrite: bool, run_config: dict[str, Any],
                   defining_fields: tuple[str, ...], kind: str) -> None:
    """Make ``output`` ready for a run and say how it relates to what is there, and check it can be written.

    - absent or empty: a fresh run;
    - holds a run of the same ``kind`` whose ``defining_fields`` equal ``run_config``'s: resumed (incremental);
    - ``overwrite``: a previous run of this kind is deleted first (never an arbitrary directory);

    Args:
        output: local path or ``s3://`` URI.
        run_config: the config of this run as written to ``run_config.json`` (``kind`` key included).
        defining_fields: the fields that define the output values (a run that differs in one is refused).
        kind: ``"label"`` or ``"predict"``: a run of one kind never resumes or overwrites the other.

    The write check creates ``output`` and writes and deletes an empty probe file in it, so a missing bucket or a
    denied write fails here, before any cluster work, instead of in the first write task.

    Raises:
        OutputExistsError: ``output`` is a file; holds something that is not a run of this kind; or holds a run whose
            defining fields differ (the message names each differing field with both values).
        ConfigError: ``output`` cannot be listed or written (no such bucket, access denied, read-only directory,
            endpoint unreachable after retries); the message names the URI and the storage's reason.
    """
    from cdul_ray.config import ConfigError

    try:
        _prepare_output(output, endpoint, overwrite, run_config, defining_fields, kind)
        fs, path = storage.filesystem(output, endpoint)
        fs.create_dir(path, recursive=True)
        probe = posixpath.join(path, _WRITE_PROBE)
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except OutputExistsError:
        raise
    except OSError as e:
        raise ConfigError("output", storage.redact(f"cannot write to {output}: {e}")) from e


_WRITE_PROBE = ".cdul_write_check"


def _prepare_output(output: str, endpoint: str | None, overwrite: bool, run_config: dict[str, Any],
                    defining_fields: tuple[str, ...], kind: str) -> None:
    fs, path = storage.filesystem(output, endpoint)
    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        return
    if info.type != FileType.Directory:
        raise OutputExistsError(f"{output} exists and is not a directory")
    if not fs.get_file_info(FileSelector(path, allow_not_found=True)):
        return
    config_path = storage.join(output, schema.RUN_CONFIG_FILE)
    previous = storage.read_json(config_path, endpoint) if storage.exists(config_path, endpoint) else None
    if previous is None or _kind(previous) != kind:
        what = f"holds a {_RUN_NAMES[_kind(previous)]}, no" if previous else "holds no"
        raise OutputExistsError(
            f"{output} is not empty and {what} {_RUN_NAMES[kind]} ({schema.RUN_CONFIG_FILE}); "
            "refusing to write into it or delete it, even with --overwrite; choose another output"
        )
    if overwrite:
        fs.delete_dir_contents(path)
        return
    differ = [f for f in defining_fields if _normal(previous.get(f)) != _normal(run_config.get(f))]
    if differ:
        detail = "; ".join(f"{f}: {previous.get(f)!r} in the output, {run_config.get(f)!r} now" for f in differ)
        raise OutputExistsError(
            f"{output} holds a run with different {', '.join(differ)} ({detail}). Mixing two "
            "label sets in one output would corrupt it: use the same settings to resume, another --output, or "
            "--overwrite to start again"
        )


_RUN_NAMES = {"label": "labeling run", "predict": "prediction run", "train": "training run"}


def _kind(run_config: dict[str, Any]) -> str:
    """The kind of run a ``run_config.json`` belongs to (runs written before ``kind`` existed are recognised too)."""
    if "kind" in run_config:
        return run_config["kind"]
    return "train" if "label_lr" in run_config else "predict" if "checkpoint" in run_config else "label"


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------------------------------
# Sink: one write task -> <results>/<name>.parquet and errors/<name>.parquet


def split_results(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Scored rows with ``error_stage``/``error_reason`` -> (result rows without those columns, ERRORS_SCHEMA rows)."""
    ok = pc.equal(table["error_stage"], "")
    results = table.filter(ok).drop_columns(list(ERROR_COLUMNS))
    bad = table.filter(pc.invert(ok))
    errors = pa.table({"image_id": bad["image_id"], "uri": bad["uri"], "stage": bad["error_stage"],
                       "reason": bad["error_reason"]}, schema=schema.ERRORS_SCHEMA)
    return results, errors


def _result_datasink_cls():
    from ray.data.datasource import BlockBasedFileDatasink

    class ResultDatasink(BlockBasedFileDatasink):
        """Writes each task's rows as ``<output>/<results_dir>/<name>.parquet`` and ``<output>/errors/<name>.parquet``.

        Both files share the task's file name, which is also its checkpoint id, so recovery finds them by prefix.
        """

        def __init__(self, output: str, results_dir: str, run_id: str, min_rows_per_file: int, filesystem: Any):
            super().__init__(output, filesystem=filesystem, min_rows_per_file=min_rows_per_file,
                             dataset_uuid=run_id, file_format="parquet")
            self.results_dir = results_dir

        def write_block(self, block: Any, block_index: int, ctx: Any) -> None:
            from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

            name = self.filename_provider.get_filename_for_task(ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx)
            results, errors = split_results(block.to_arrow())
            for sub, table in ((self.results_dir, results), (schema.ERRORS_DIR, errors)):
                if table.num_rows:
                    pq.write_table(table, posixpath.join(self.path, sub, name), filesystem=self.filesystem)

        def on_write_start(self, schema_: Any = None) -> None:
            super().on_write_start(schema_)
            for sub in (self.results_dir, schema.ERRORS_DIR):
                self.filesystem.create_dir(posixpath.join(self.path, sub), recursive=True)

    return ResultDatasink


def _checkpoint_manager_cls(results_dir: str):
    """Ray's id-column checkpoint manager, adapted to this sink; the ids themselves are skipped by the index.

    - Clean-up: Ray's lists the sink's root recursively, which here holds the checkpoint directory itself; this one
      deletes a stopped run's uncommitted data files in ``results_dir/`` and ``errors/`` only, and keeps the data of a
      task whose commit (a copy + delete on S3) was cut between its two steps.
    - Filtering: Ray 2.60 filters with a ``CheckpointFilter`` actor pool whose actors take 1 CPU each (not
      configurable). On a 2-CPU node with one CLIP actor that left no CPU for the read and write tasks, and a resumed
      run hung (measured). :func:`stream_to_parquet` therefore leaves committed ids out of the index it writes, and
      this manager reports nothing to filter.
    """
    from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager

    class ResultCheckpointManager(IdColumnCheckpointManager):
        def load_checkpoint(self, data_file_dir: str | None = None, data_file_filesystem: Any = None):
            if data_file_dir:
                self._clean_pending_checkpoints(data_file_dir, data_file_filesystem)
            return None, 0

        def _clean_pending_checkpoints(self, data_file_dir: str, data_file_filesystem: Any = None) -> None:
            fs = data_file_filesystem or self.filesystem
            names = {posixpath.basename(f.path): f.path for f in self.filesystem.get_file_info(
                FileSelector(self.checkpoint_path_unwrapped, allow_not_found=True)) if f.type == FileType.File}
            pending = {n[: -len(_PENDING_SUFFIX)]: p for n, p in names.items() if n.endswith(_PENDING_SUFFIX)}
            uncommitted = tuple(base for base in pending if f"{base}.parquet" not in names)
            root = data_file_dir[len("s3://"):] if data_file_dir.startswith("s3://") else data_file_dir
            deleted = 0
            if uncommitted:
                for sub in (results_dir, schema.ERRORS_DIR):
                    for f in fs.get_file_info(FileSelector(posixpath.join(root, sub), allow_not_found=True)):
                        if f.type == FileType.File and posixpath.basename(f.path).startswith(uncommitted):
                            fs.delete_file(f.path)
                            deleted += 1
            for path in pending.values():
                self.filesystem.delete_file(path)
            if pending:
                logger.info("resume: rolled back %d uncommitted write task(s) of a stopped run (%d data files)",
                            len(uncommitted), deleted)

    return ResultCheckpointManager


def committed_ids(output: str, endpoint: str | None) -> pa.Array:
    """Image ids of every write task committed to ``<output>/_checkpoint`` (Ray's checkpoint files), as strings."""
    fs, path = storage.filesystem(storage.join(output, schema.CHECKPOINT_DIR), endpoint)
    files = [f.path for f in fs.get_file_info(FileSelector(path, allow_not_found=True))
             if f.type == FileType.File and f.path.endswith(".parquet") and not f.path.endswith(_PENDING_SUFFIX)]
    if not files:
        return pa.array([], pa.string())
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[ID_COLUMN])[ID_COLUMN].combine_chunks()


_PENDING_SUFFIX = ".pending.parquet"


# --------------------------------------------------------------------------------------------------------------------
# The skeleton


@dataclass(frozen=True)
class Stage:
    """One ``map_batches`` stage: a function (tasks) or a callable class (actor pool) and its Ray arguments."""

    fn: Callable[..., Any] | type
    batch_size: int
    kwargs: dict[str, Any]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: tuple[int, int] | None = None  # (min, max) of an ActorPoolStrategy; None for tasks


@dataclass(frozen=True)
class StreamResult:
    """What one streamed run wrote (this run only): rows in ``<results>/`` and in ``errors/``."""

    results: int
    errors: int


def stream_to_parquet(records: pa.Table, output: str, endpoint: str | None, results_dir: str,
                      stages: tuple[Stage, Stage], rows_per_file: int) -> StreamResult:
    """Run ``records`` through a decode stage and a model stage into ``<output>/<results_dir>/`` and ``errors/``.

    Rows whose ``image_id`` an earlier run committed are skipped (resume and incremental runs); see the module
    docstring for the guarantees. The index rows are written under ``<output>/_index/`` first (Ray Data checkpointing
    starts from a read).

    Args:
        records: the corpus index (``schema.INDEX_SCHEMA`` columns), ``image_id`` unique.
        stages: (decode stage, model stage); the model stage returns Arrow tables with ``image_id``, ``uri`` and
            ``ERROR_COLUMNS``.
        rows_per_file: minimum rows buffered per write task (the most a kill can lose).

    Returns:
        Rows written by this run.
    """
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    fs, out_path = storage.filesystem(output, endpoint)
    records = records.filter(pc.invert(pc.is_in(records[ID_COLUMN], value_set=committed_ids(output, endpoint))))
    index_dir = posixpath.join(out_path, schema.INDEX_DIR)
    fs.create_dir(index_dir, recursive=True)
    fs.delete_dir_contents(index_dir, missing_dir_ok=True)
    step = max(1, rows_per_file)
    for i, start in enumerate(range(0, records.num_rows, step)):
        pq.write_table(records.slice(start, step), posixpath.join(index_dir, f"part-{i:06d}.parquet"), filesystem=fs)

    if not records.num_rows:
        return StreamResult(0, 0)

    run_id = uuid.uuid4().hex[:12]
    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config, ctx.use_datasource_v2
    ctx.checkpoint_config = CheckpointConfig(
        id_column=ID_COLUMN,
        checkpoint_path=storage.join(output, schema.CHECKPOINT_DIR),
        override_filesystem=fs,
        delete_checkpoint_on_success=False,  # kept: a later run over a grown corpus labels only the new ids
        checkpoint_manager_cls=_checkpoint_manager_cls(results_dir),
    )
    ctx.use_datasource_v2 = False  # 2.60's V2 Parquet reader merges small files into one block: nothing would stream
    try:
        shown = ctx.enable_progress_bars
        # read_parquet's file-sampling tqdm bar ignores a non-terminal console (redraws in logs): off for that call
        ctx.enable_progress_bars = shown and sys.stderr.isatty()
        try:
            ds = ray.data.read_parquet(index_dir, filesystem=fs)
        finally:
            ctx.enable_progress_bars = shown
        ds.context.enable_progress_bars = shown  # the labeling stages keep Ray's progress
        # index files hold `rows_per_file` rows (few files on S3); decode tasks take small blocks (parallelism)
        ds = ds.repartition(target_num_rows_per_block=stages[0].batch_size)
        for stage in stages:
            if stage.actors:
                kw = {"compute": ray.data.ActorPoolStrategy(min_size=stage.actors[0], max_size=stage.actors[1]),
                      "fn_constructor_kwargs": stage.kwargs}
            else:
                kw = {"fn_kwargs": stage.kwargs}
            ds = ds.map_batches(stage.fn, batch_size=stage.batch_size, num_cpus=stage.num_cpus,
                                num_gpus=stage.num_gpus, **kw)
        sink = _result_datasink_cls()(out_path, results_dir, run_id, rows_per_file, fs)
        wait_for_free_cpu()  # the previous run's actors may still be handing their CPUs back
        # Writes reserve no CPU: with a CLIP actor (1 CPU) and decode tasks (0.5 each) filling a small node, a 1-CPU
        # write task waited for the last image, and nothing reached disk before the end (measured on 2 CPUs).
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    finally:
        ctx.checkpoint_config, ctx.use_datasource_v2 = saved
    errors_dir = posixpath.join(out_path, schema.ERRORS_DIR)
    if not _parquet_files(fs, errors_dir):  # an empty errors table keeps the layout fixed for readers
        fs.create_dir(errors_dir, recursive=True)
        pq.write_table(schema.ERRORS_SCHEMA.empty_table(), posixpath.join(errors_dir, schema.EMPTY_ERRORS_FILE), filesystem=fs)
    return StreamResult(_count(fs, posixpath.join(out_path, results_dir), run_id),
                        _count(fs, posixpath.join(out_path, schema.ERRORS_DIR), run_id))


def _parquet_files(fs: Any, directory: str, prefix: str = "") -> list[str]:
    return [f.path for f in fs.get_file_info(FileSelector(directory, allow_not_found=True))
            if f.type == FileType.File and f.path.endswith(".parquet") and posixpath.basename(f.path).startswith(prefix)]


def _count(fs: Any, directory: str, prefix: str = "") -> int:
    files = _parquet_files(fs, directory, prefix)
    return pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0


def count_rows(output: str, endpoint: str | None, subdir: str) -> int:
    """Rows in every Parquet file of ``<output>/<subdir>/`` (from the files' footers, no data read)."""
    fs, path = storage.filesystem(output, endpoint)
    return _count(fs, posixpath.join(path, subdir))

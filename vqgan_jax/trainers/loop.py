"""What every trainer shares: the job runner (:func:`run_job`) with sharded state creation,
checkpoints, writers and the training loop."""

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from vqgan_jax import console, parallel, workdir as workdir_lib
from vqgan_jax.trainers.writers import JsonlWriter, LoggedFailures, metric_writers


def create_sharded_state(init_fn: Callable[..., Any], rng: jax.Array, mesh: Mesh,
                         rules: parallel.Rules = ()) -> tuple[Any, Any]:
    """Build ``init_fn(rng)`` directly on the mesh, never materialised on one device.

    ``init_fn(rng, boxed=True)`` must return the state with its parameters (and the optimizer
    states made from them) still in their ``nn.LogicallyPartitioned`` boxes; it is only traced
    (``jax.eval_shape``) to read the logical axis names. ``init_fn(rng)`` returns the plain
    state that is built, jitted with the resulting ``out_shardings``.

    Args:
      rules: logical-axis rules (:func:`vqgan_jax.parallel.rules_from_config`); empty: every
        array replicated.

    Returns:
      ``(state, shardings)``: the state with every array laid out by
      :func:`vqgan_jax.parallel.state_shardings`, and that pytree of NamedShardings.
    """
    _, shardings = abstract_sharded_state(init_fn, rng, mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


def abstract_sharded_state(init_fn: Callable[..., Any], rng: jax.Array, mesh: Mesh,
                           rules: parallel.Rules = ()) -> tuple[Any, Any]:
    """``(abstract, shardings)``: the ShapeDtypeStructs of ``init_fn(rng)`` and the
    NamedShardings :func:`create_sharded_state` lays it out with, read from the logical axis
    names of ``init_fn(rng, boxed=True)``; traced once, nothing compiled or allocated."""
    boxed = jax.eval_shape(functools.partial(init_fn, boxed=True), rng)
    return nn.meta.unbox(boxed), parallel.state_shardings(boxed, mesh, rules)


def compile_step(step_fn: Any, args: tuple, *, mesh: Mesh, rules: parallel.Rules,
                 workdir: str | None = None, name: str = "train_step") -> Any:
    """Lower and compile the jitted ``step_fn`` for ``args`` ahead of the first step, log its
    memory and cost analysis, and return the compiled executable (used for every step, so the
    step is compiled once).

    Tracing happens under :func:`vqgan_jax.parallel.sharding_context`, so the models'
    activation constraints apply. ``args`` may hold ShapeDtypeStructs with shardings (the batch
    before it exists, :func:`vqgan_jax.parallel.abstract_batch`); the executable then takes
    arrays of exactly those shapes, dtypes and shardings.

    Writes ``workdir/compile_stats.json`` (process 0) with :func:`compile_stats`.
    """
    t0 = time.perf_counter()
    with parallel.sharding_context(mesh, rules):
        lowered = step_fn.lower(*args)
    compiled = lowered.compile()
    stats = dict(compile_stats(compiled), name=name, compile_s=round(time.perf_counter() - t0, 3),
                 mesh=dict(mesh.shape), device_kind=jax.devices()[0].device_kind,
                 num_devices=jax.device_count())
    mib = lambda k: (stats.get(k) or 0) / 2 ** 20
    logging.info("Compiled %s in %.1f s on a %s mesh: per device %.1f MiB arguments, %.1f MiB "
                 "outputs (%.1f MiB aliased), %.1f MiB temporaries, %.1f MiB code; %.3g FLOPs "
                 "per device (XLA's count for one step)", name, stats["compile_s"], stats["mesh"],
                 mib("argument_bytes"), mib("output_bytes"), mib("alias_bytes"),
                 mib("temp_bytes"), mib("generated_code_bytes"), stats.get("flops") or 0.0)
    if workdir is not None and jax.process_index() == 0:
        workdir_lib.write_json(os.path.join(workdir, "compile_stats.json"), stats)
    return compiled


_MEMORY_FIELDS = {"argument_bytes": "argument_size_in_bytes",
                  "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes",
                  "temp_bytes": "temp_size_in_bytes",
                  "generated_code_bytes": "generated_code_size_in_bytes",
                  "peak_bytes": "peak_memory_in_bytes"}


def compile_stats(compiled: Any) -> dict[str, float | None]:
    """XLA's memory and cost analysis of a compiled executable, per device.

    Returns:
      ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (outputs that reuse donated
      arguments), ``temp_bytes``, ``generated_code_bytes``, ``peak_bytes`` (ints; None where the
      backend reports no memory analysis or lacks the field), ``flops`` and ``bytes_accessed``
      (floats from the cost analysis; None where it gives none). On the CPU backend
      ``peak_bytes`` is 0. Both analyses describe the partitioned program that one device
      runs: the FLOPs of a step over N devices are about N x ``flops``.
    """
    stats: dict[str, float | None] = {k: None for k in (*_MEMORY_FIELDS, "flops",
                                                        "bytes_accessed")}
    try:
        memory = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # some backends have none
        memory = None
    if memory is not None:
        for ours, xla in _MEMORY_FIELDS.items():
            value = getattr(memory, xla, None)
            stats[ours] = None if value is None else int(value)
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost:
        stats["flops"] = float(cost["flops"]) if "flops" in cost else None
        stats["bytes_accessed"] = (float(cost["bytes accessed"]) if "bytes accessed" in cost
                                   else None)
    return stats


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """clu writer: console logging everywhere; on process 0 also TensorBoard events and
    ``scalars.jsonl`` (one JSON object ``{"step": s, name: value, ...}`` a line) in workdir,
    whose failing writes are logged without stopping training (:class:`LoggedFailures`)."""
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    if jax.process_index() > 0:
        return writer
    # A failing write (full disk, an unwritable file) is logged and training goes on.
    return metric_writers.MultiWriter([
        LoggedFailures(writer, f"TensorBoard ({workdir})"),
        LoggedFailures(JsonlWriter(os.path.join(workdir, "scalars.jsonl")),
                       os.path.join(workdir, "scalars.jsonl"))])


def write_picture(writer: metric_writers.MetricWriter, workdir: str, step: int, tag: str,
                  filename: str, picture: np.ndarray) -> None:
    """A uint8[H, W, 3] picture as TensorBoard image ``tag`` and, on process 0, as the PNG
    ``workdir/filename`` (replaced at each call)."""
    writer.write_images(step, {tag: picture[None].astype(np.float32) / 255})
    if jax.process_index() == 0:
        workdir_lib.write_png(os.path.join(workdir, filename), picture)


def update_if_finite(state: Any, grads: Any, loss: jax.Array, tx: Any
                     ) -> tuple[Any, jax.Array, jax.Array]:
    """One ``tx`` update of ``state.params`` and ``state.opt_state`` (a stage-2 TrainState),
    kept only when ``loss`` and the gradient norm are finite: a NaN/Inf step leaves both as
    they were (the caller still advances the step; :class:`NonFiniteGuard` counts it).

    Returns:
      ``(new_state, grad_norm, finite)``: float32[] global gradient norm, bool[] finite.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = all_finite(loss, grad_norm)
    updated = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return new_state, grad_norm, finite


def all_finite(*scalars: jax.Array) -> jax.Array:
    """bool[]: True when every one of ``scalars`` is finite (no NaN, no +-Inf)."""
    return jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(x, jnp.float32) for x in scalars])))


class NonFiniteGuard:
    """Counts the train steps skipped for a NaN/Inf loss or gradient and stops a run that keeps
    producing them.

    The step reports ``metrics["nonfinite"]`` (0 or 1) and leaves the state unchanged itself;
    this host-side guard reads each flag one step late, so that reading it never stalls the
    dispatch of the next step.

    Raises:
      FloatingPointError: from :meth:`observe` or :meth:`flush` once ``max_consecutive``
        steps in a row were non-finite, naming the last of them.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0      # consecutive non-finite steps up to the last one checked
        self._unchecked: list[tuple[int, jax.Array]] = []

    def observe(self, step: int, flag: jax.Array) -> None:
        """Queue ``flag`` (float32[], 1 = non-finite) of ``step``; check the ones before it."""
        self._unchecked.append((step, flag))
        while len(self._unchecked) > 1:
            self._check(*self._unchecked.pop(0))

    def flush(self) -> None:
        """Check every queued flag now (before a checkpoint, and at the end)."""
        while self._unchecked:
            self._check(*self._unchecked.pop(0))

    def _check(self, step: int, flag: jax.Array) -> None:
        if float(jax.device_get(flag)) == 0.0:
            self.streak = 0
            return
        self.streak += 1
        logging.warning("Step %d: non-finite loss or gradient; update skipped (%d in a row).",
                        step, self.streak)
        if self.streak >= self.max_consecutive:
            raise FloatingPointError(
                f"Steps {step - self.streak + 1} to {step}: {self.streak} consecutive steps with a "
                f"non-finite loss or gradient (config.max_consecutive_nonfinite="
                f"{self.max_consecutive}); stopped at step {step} without saving. The last good "
                "checkpoint is untouched: lower the learning rate or check the data, then resume.")


def jit_step(step_fn: Callable[..., tuple[Any, dict]], mesh: Mesh, state_shardings: Any,
             frozen_shardings: Any) -> Any:
    """``step_fn(state, batch, frozen) -> (state, metrics)`` jitted once over ``mesh``: the
    state keeps ``state_shardings`` and is donated (on accelerators), the batch is split over
    the data axes, the frozen inputs (LPIPS weights, tokenizers) take ``frozen_shardings``;
    metrics replicated.

    On a CPU mesh the state is not donated: XLA:CPU fuses each Adam moment's update into both
    its in-place write and the parameter update, so to write a donated moment in place it first
    copies it (about 400 copies a step); new buffers cost less (1.7% of the peer benchmark's
    step, BENCHMARKS.md) and one more state of host memory. The caller must not reuse a state
    it passed in either case."""
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return jax.jit(step_fn, in_shardings=(state_shardings, parallel.batch_sharding(mesh),
                                          frozen_shardings),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=() if on_cpu else 0)


@dataclasses.dataclass
class Job:
    """What a stage plugs into :func:`run_job`, built on the job's mesh.

    Attributes:
      init: ``init(rng, boxed=False) -> state`` (:func:`create_sharded_state`).
      jit_step: ``(program, state_shardings) -> jitted step(state, batch, frozen)``
        (:func:`jit_step`) of each name ``program(steps done)`` gives.
      frozen: the step's inputs that training never changes, already on the mesh.
      finish: ``(state, step, summary, writer) -> result`` after the last step.
      batch_fields: the records' fields the step reads: ``image`` (float32[B, S, S, 3] in
        [-1, 1]) and ``label`` (int32[B]).
      extra_scalars: ``(steps, seconds) -> scalars`` logged with each training summary.
      evaluate: ``(state, step, writer)``, every ``config.eval_every_steps`` before the end.
    """
    init: Callable[..., Any]
    jit_step: Callable[[str, Any], Any]
    frozen: Any
    finish: Callable[[Any, int, dict, Any], dict]
    batch_fields: tuple[str, ...] = ("image",)
    program: Callable[[int], str] = lambda step: "train_step"
    extra_scalars: Callable[[int, float], dict] = lambda steps, seconds: {}
    evaluate: Callable[[Any, int, Any], Any] | None = None


def run_job(config: Any, workdir: str, train_source: Any,
            make_job: Callable[[Mesh, parallel.Rules, str], Job]) -> dict:
    """Run a training job of any stage in ``workdir`` to ``config.num_train_steps``, resuming
    from its newest complete checkpoint (a save cut short leaves only a temporary folder).

    Sets up what every stage shares: the workdir, the mesh and logical-axis rules of
    ``config``, the augmented stream of ``train_source``, the state of
    ``make_job(mesh, rules, workdir).init`` built sharded and restored (:class:`RunCheckpoints`:
    state, data position, config), each step program compiled ahead (:func:`compile_step`,
    ``compile_stats.json``), the writer (:func:`create_writer`: TensorBoard, ``scalars.jsonl``).

    Each step: stop and save if preempted (SIGTERM, :class:`Preemption`); run the program
    ``job.program(steps done)``; its ``nonfinite`` flag to :class:`NonFiniteGuard`; every
    ``config.log_every_steps`` (and at the last step) the mean of the metrics since the last
    log, ``img_per_s``, ``job.extra_scalars`` and ``nonfinite_steps`` written as ``train/*``
    (steps/s and ETA to the writer, :class:`vqgan_jax.console.Progress` to the console); every
    ``config.checkpoint_every_steps`` a save (skipped inside a non-finite streak); every
    ``config.eval_every_steps`` before the end ``job.evaluate``; the test fault hook
    (:func:`fault_injector`). At the end the last step is saved if it was not, then
    ``job.finish``. Checkpoints in flight finish writing whatever happens.

    Returns:
      ``job.finish(...)``, or ``{"preempted_at_step": step}`` after a preemption (saved).

    Raises:
      FloatingPointError: from :class:`NonFiniteGuard`, without saving.
    """
    from vqgan_jax.data import pipeline
    from vqgan_jax.trainers.writers import periodic_actions
    workdir = workdir_lib.ensure_writable_workdir(workdir)
    mesh, rules = parallel.mesh_from_config(config), parallel.rules_from_config(config)
    train_iter = pipeline.train_iterator(
        train_source, image_size=config.image_size, global_batch_size=config.batch_size,
        seed=config.seed, min_crop_scale=config.min_crop_scale, crop_mode=config.crop_mode)
    job = make_job(mesh, rules, workdir)
    rng = jax.random.key(config.seed)
    abstract, shardings = abstract_sharded_state(job.init, rng, mesh, rules)
    checkpoints = workdir_lib.RunCheckpoints(workdir, config, train_iter)
    # A resumed run restores onto the state's shapes and shardings without building it first
    # (the init program, which compiles slowly for a large model, is compiled only for step 0).
    state = checkpoints.restore_latest(
        abstract, shardings, init=lambda: jax.jit(job.init, out_shardings=shardings)(rng))
    manager, num_train_steps = checkpoints.manager, config.num_train_steps
    b, size = config.batch_size, config.image_size
    fields = {"image": ((b, size, size, 3), jnp.float32), "label": ((b,), jnp.int32)}
    abstract_args = (workdir_lib.abstract_like(state, shardings), parallel.abstract_batch(
        {k: fields[k] for k in job.batch_fields}, mesh), job.frozen)
    programs = {}  # name -> compiled step; each compiled when first needed

    def program(step: int) -> Any:
        name = job.program(step)
        if name not in programs:
            programs[name] = compile_step(job.jit_step(name, shardings), abstract_args,
                                          mesh=mesh, rules=rules, workdir=workdir, name=name)
        return programs[name]

    step = int(jax.device_get(state.step))
    program(step)
    writer = create_writer(workdir)
    writer.write_hparams(dict(config.to_dict()))
    logging.info("Training %s from step %d to %d on a %s mesh", config.dataset, step,
                 num_train_steps, dict(mesh.shape))
    guard, preemption = NonFiniteGuard(config.max_consecutive_nonfinite), Preemption(manager)
    inject_fault = fault_injector()
    report = periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
    progress = console.Progress(step, num_train_steps, process_index=jax.process_index())
    pending, t_log, nonfinite_steps, summary = [], time.perf_counter(), 0, {}
    try:
        while step < num_train_steps:
            if preemption.requested(step):
                guard.flush()
                if manager.latest_step() != step:
                    checkpoints.save(state, step, force=True)
                logging.warning("Preempted: saved step %d in %s; the same command resumes.",
                                step, manager.directory)
                return {"preempted_at_step": step}
            record = next(train_iter)
            batch = parallel.global_batch({k: record[k] for k in job.batch_fields}, mesh)
            state, metrics = program(step)(state, batch, job.frozen)
            step += 1
            guard.observe(step, metrics["nonfinite"])
            pending.append(metrics)
            report(step)
            progress.step()
            if step % config.log_every_steps == 0 or step == num_train_steps:
                fetched = jax.device_get(pending)
                summary = jax.tree.map(lambda *m: float(np.mean(m)), *fetched)
                nonfinite_steps += sum(int(m["nonfinite"]) for m in fetched)
                seconds = time.perf_counter() - t_log
                summary.update(img_per_s=len(fetched) * b / seconds,
                               **job.extra_scalars(len(fetched), seconds))
                summary["nonfinite_steps"] = nonfinite_steps  # skipped updates, this process
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                progress.log(step, summary)
                pending, t_log = [], time.perf_counter()
            if step % config.checkpoint_every_steps == 0:
                guard.flush()   # raises before saving if this step ends a bad streak
                if guard.streak == 0:
                    checkpoints.save(state, step)
            if job.evaluate and step % config.eval_every_steps == 0 and step < num_train_steps:
                job.evaluate(state, step, writer)
            inject_fault(step)
        guard.flush()
        if manager.latest_step() != step:
            checkpoints.save(state, step, force=True)
        preemption.close()  # the final evaluation runs with the usual SIGTERM handling
        progress.close()
        if not summary:  # a finished run started again: its last log, not an empty summary
            summary = last_logged_train_metrics(workdir)
        return job.finish(state, step, summary, writer)
    finally:  # Whatever happened, let the checkpoint in flight finish writing.
        preemption.close()
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()


def last_logged_train_metrics(workdir: str) -> dict[str, float]:
    """The newest ``train/*`` row of ``workdir/scalars.jsonl`` without the prefix (and without
    ``step``); ``{}`` when there is none (no file: processes other than 0, or nothing logged)."""
    try:
        with open(os.path.join(workdir, "scalars.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"train/' in line]
    except (OSError, ValueError):
        return {}
    if not rows:
        return {}
    return {k.removeprefix("train/"): v for k, v in rows[-1].items() if k.startswith("train/")}


FAULT_ENV = "VQGAN_JAX_FAULT"


def fault_injector() -> Callable[[int], None]:
    """Fault injection for the tests of resume and preemption.

    With ``VQGAN_JAX_FAULT="STEP:SIGNAL"`` in the environment (e.g. ``"5:SIGKILL"``), the
    returned function sends this process ``SIGNAL`` once step ``STEP`` has finished and been
    logged: a crash or a preemption at an exact step. Without the variable it does nothing.

    Raises:
      ValueError: naming the variable when its value is not of that form.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return lambda step: None
    try:
        at, name = spec.split(":")
        at, signum = int(at), getattr(signal, name)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected STEP:SIGNAL, e.g. 5:SIGKILL.") from e

    def inject(step: int) -> None:
        if step == at:
            logging.warning("%s: sending %s after step %d.", FAULT_ENV, name, step)
            os.kill(os.getpid(), signum)
    return inject


class Preemption:
    """Notices SIGTERM (preemption) so the loop can save at the next step boundary and exit.

    On one process a SIGTERM handler sets a flag (the previous handler is restored on
    :meth:`close`). With several processes, ``jax.distributed`` already listens for the
    signal and :meth:`orbax.checkpoint.CheckpointManager.reached_preemption` makes all hosts
    agree on the step; that is what :meth:`requested` asks then.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self._signalled = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving at the next step boundary, then exiting.")
        self._signalled.set()

    def requested(self, step: int) -> bool:
        """True when the run should save at ``step`` and stop."""
        if jax.process_count() > 1:
            return self._manager.reached_preemption(step)
        return self._signalled.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

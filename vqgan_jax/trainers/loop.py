"""What every trainer shares: sharded state creation, checkpoints, writers, config checks."""

import functools
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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
    abstract = jax.eval_shape(functools.partial(init_fn, boxed=True), rng)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


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
        if max_consecutive < 1:
            raise ValueError(f"config.max_consecutive_nonfinite={max_consecutive} must be >= 1.")
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


def train_loop(state: Any, step_fn: Callable[[Any, Any, int], tuple[Any, dict]],
               next_batch: Callable[[], Any], *, num_train_steps: int, log_every_steps: int,
               checkpoint_every_steps: int, max_consecutive_nonfinite: int,
               manager: ocp.CheckpointManager, save: Callable[..., None],
               writer: metric_writers.MetricWriter,
               extra_scalars: Callable[[int, float], dict[str, float]],
               after_step: Callable[[Any, int], None] | None = None
               ) -> tuple[Any, int, dict[str, float], bool]:
    """The training loop both stages share, from ``state.step`` to ``num_train_steps``.

    Each iteration: stop and save if preempted (SIGTERM, :class:`Preemption`); one step
    ``state, metrics = step_fn(state, next_batch(), step)`` (``step``: the number of steps
    done before it, a host int, e.g. to pick a program); the non-finite flag of the step to
    :class:`NonFiniteGuard`; every ``log_every_steps`` (and at the last step) the mean of the
    metrics since the last log plus ``extra_scalars(num_steps, seconds)`` and
    ``nonfinite_steps`` written as ``train/*``; every ``checkpoint_every_steps`` a save
    (skipped inside a non-finite streak); then ``after_step(state, step)`` (evaluation) and
    the test fault hook (:func:`fault_injector`). At the end the last step is saved if it
    was not. ``report`` progress (steps/s, ETA) goes to ``writer``; the console shows
    :class:`vqgan_jax.console.Progress` (a live bar on a terminal, else a line at every log).

    Args:
      step_fn: the jitted step; its metrics hold float32 scalars including ``nonfinite``.
      save: ``save(state, step, force=False)`` writes a checkpoint through ``manager``.

    Returns:
      ``(state, step, summary, preempted)``: the final state and step, the last logged
      summary, and whether the loop stopped for a preemption (after saving).

    Raises:
      FloatingPointError: from :class:`NonFiniteGuard`.
    """
    from vqgan_jax.trainers.writers import periodic_actions
    step = int(jax.device_get(state.step))
    guard = NonFiniteGuard(max_consecutive_nonfinite)
    preemption = Preemption(manager)
    inject_fault = fault_injector()
    report = periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
    progress = console.Progress(step, num_train_steps, process_index=jax.process_index())
    pending, t_log, nonfinite_steps, summary = [], time.perf_counter(), 0, {}
    try:
        while step < num_train_steps:
            if preemption.requested(step):
                guard.flush()
                if manager.latest_step() != step:
                    save(state, step, force=True)
                logging.warning("Preempted: saved step %d in %s; the same command resumes.",
                                step, manager.directory)
                return state, step, summary, True
            state, metrics = step_fn(state, next_batch(), step)
            step += 1
            guard.observe(step, metrics["nonfinite"])
            pending.append(metrics)
            report(step)
            progress.step()
            if step % log_every_steps == 0 or step == num_train_steps:
                fetched = jax.device_get(pending)
                summary = jax.tree.map(lambda *m: float(np.mean(m)), *fetched)
                nonfinite_steps += sum(int(m["nonfinite"]) for m in fetched)
                summary.update(extra_scalars(len(fetched), time.perf_counter() - t_log))
                summary["nonfinite_steps"] = nonfinite_steps  # skipped updates, this process
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                progress.log(step, summary)
                pending, t_log = [], time.perf_counter()
            if step % checkpoint_every_steps == 0:
                guard.flush()   # raises before saving if this step ends a bad streak
                if guard.streak == 0:
                    save(state, step)
            if after_step is not None:
                after_step(state, step)
            inject_fault(step)
        guard.flush()
        if manager.latest_step() != step:
            save(state, step, force=True)
    finally:
        preemption.close()
        progress.close()
    return state, step, summary, False


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

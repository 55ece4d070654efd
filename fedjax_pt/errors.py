"""What a failed run tells its caller: exception types and the exit codes `fedjax_pt.main` maps them
to, so that scripts (sweeps, schedulers) can act on the outcome without reading its output.

Every one of these ends the run with a single line on stderr that names the culprit.
"""

import threading

EXIT_BAD_INPUT = 2  # a bad flag, config value, data file or checkpoint: fix the command
EXIT_WORKDIR_REFUSED = 3  # --workdir holds another experiment (or ckpt.restore=False): move it
EXIT_TRAINING_FAILED = 4  # the run diverged, ran out of memory, or no round updated the model
EXIT_WORKDIR_BUSY = 5  # another process is writing to --workdir right now
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: the same command resumes


class WorkdirRefused(ValueError):
  """The workdir holds a run that this command must not continue."""


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class TrainingFailed(RuntimeError):
  """The run ended without a usable model: it diverged, or every round was skipped."""


class Interrupted(RuntimeError):
  """SIGINT or SIGTERM: the run stopped at a round boundary or mid-round, checkpoints intact."""


# Set by `fedjax_pt.main` when SIGINT or SIGTERM arrives, besides raising KeyboardInterrupt: a
# KeyboardInterrupt that lands in a finalizer (a __del__ run by the garbage collector) or in a
# library that swallows it is lost, and the run would go on; the run loop checks this at every
# round boundary, so a stop request is never lost.
STOP_REQUESTED = threading.Event()


def exit_code(error: BaseException) -> int | None:
  """The exit code a command ends with when a run raised `error`; None for an error that is
  nobody's input (a bug: it keeps its traceback)."""
  for kind, code in ((WorkdirRefused, EXIT_WORKDIR_REFUSED), (WorkdirBusy, EXIT_WORKDIR_BUSY),
                     (TrainingFailed, EXIT_TRAINING_FAILED), (Interrupted, EXIT_INTERRUPTED)):
    if isinstance(error, kind):
      return code
  if out_of_memory(error) is not None:
    return EXIT_TRAINING_FAILED
  # Bad input or an unusable workdir (not a directory, not writable, disk full).
  if isinstance(error, (ValueError, OSError, ImportError)):
    return EXIT_BAD_INPUT
  return None


def out_of_memory(error: BaseException) -> str | None:
  """The one line to report when `error` is a device or host running out of memory, else None.

  The up-front estimate (`fedjax_pt.planning.memory`) refuses runs that cannot fit before anything
  is built; this is for the ones it let through (an allocator's overhead, another process's memory).
  XLA reports it as a JaxRuntimeError whose message starts with RESOURCE_EXHAUSTED, followed by
  pages of buffer assignment: keep its first line only.
  """
  text = str(error)
  # Only an allocation: tensorstore also says RESOURCE_EXHAUSTED, of a full disk (a save's error).
  allocating = isinstance(error, MemoryError) or any(
      kind.__name__ == 'JaxRuntimeError' for kind in type(error).__mro__)
  # XLA:GPU says RESOURCE_EXHAUSTED; XLA:CPU, an INTERNAL error that says "Out of memory".
  exhausted = 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text
  if not (allocating and (isinstance(error, MemoryError) or exhausted)):
    return None
  first = (text.strip().splitlines() or [type(error).__name__])[0][:300]
  return (f'out of memory while training: {first}; lower data.batch_size, or set '
          'data.micro_batch_size or model.remat (--config.dry_run=True prints the estimate); '
          're-running the same command resumes from the last checkpoint')

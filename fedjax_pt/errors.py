"""What a failed run tells its caller: exception types and the exit codes `fedjax_pt.main` maps them
to, so that scripts (sweeps, schedulers) can act on the outcome without reading its output."""

EXIT_BAD_INPUT = 2  # a bad flag, config value, data file or checkpoint: fix the command
EXIT_WORKDIR_REFUSED = 3  # --workdir holds another experiment (or ckpt.restore=False): move it


class WorkdirRefused(ValueError):
  """The workdir holds a run that this command must not continue."""

"""Which failure gets which exit code, and which is reported as an out-of-memory error."""

import jax

from fedjax_pt import errors


def test_an_allocation_that_fails_is_out_of_memory_on_either_backend():
  gpu = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 '
                                   'bytes.\nBuffer assignment...')
  cpu = jax.errors.JaxRuntimeError('INTERNAL: Out of memory while trying to allocate 2**40 bytes')
  for error in (gpu, cpu, MemoryError()):
    assert errors.exit_code(error) == errors.EXIT_TRAINING_FAILED
    assert errors.out_of_memory(error).startswith('out of memory while training: ')
  assert '\n' not in errors.out_of_memory(gpu)


def test_a_full_disk_is_not_out_of_memory():
  """Tensorstore reports a full disk as RESOURCE_EXHAUSTED too: that is the save's error."""
  disk = OSError('a checkpoint could not be written (No space left on device: ValueError: '
                 'RESOURCE_EXHAUSTED: Error writing local file ...)')
  assert errors.out_of_memory(disk) is None
  assert errors.exit_code(disk) == errors.EXIT_BAD_INPUT


def test_exit_codes():
  assert errors.exit_code(errors.WorkdirRefused('x')) == errors.EXIT_WORKDIR_REFUSED
  assert errors.exit_code(errors.WorkdirBusy('x')) == errors.EXIT_WORKDIR_BUSY
  assert errors.exit_code(errors.TrainingFailed('x')) == errors.EXIT_TRAINING_FAILED
  assert errors.exit_code(errors.Interrupted('x')) == errors.EXIT_INTERRUPTED
  assert errors.exit_code(ValueError('bad key')) == errors.EXIT_BAD_INPUT
  assert errors.exit_code(KeyError('a bug')) is None  # keeps its traceback

"""Errors that stop a run on purpose: the CLI prints their message as one line (no traceback) and exits with
the error's own code, so scripts and schedulers can tell the causes apart.

Exit codes of `train_network.py`: 0 done, 2 bad input (`UserInputError`), 3 training diverged (`NonFiniteError`),
69 another process of a several-process run was lost (`ProcessLostError`, sysexits' EX_UNAVAILABLE),
75 the output is in use by another run (`OutputInUseError`, sysexits' EX_TEMPFAIL: try again later),
130 Ctrl-C, 143 SIGTERM (128 + the signal number, as a shell reports a process killed by it).
"""

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_PROCESS_LOST = 69
EXIT_OUTPUT_IN_USE = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class RunStopped(Exception):
    """A run refused or stopped with a one-line message that says what is wrong and what to do."""

    exit_code = 1


class UserInputError(RunStopped):
    """Bad input the user can fix (missing folder, broken image, bad flag value).

    The message is a single line that says what is wrong and what to do about it.
    """

    exit_code = EXIT_BAD_INPUT


class NonFiniteError(RunStopped, ValueError):
    """A NaN or infinity in the loss, the gradients, or tensors about to be written: the run stops (or the
    writer refuses) so that no file is replaced by a worse one."""

    exit_code = EXIT_NON_FINITE


class OutputInUseError(RunStopped):
    """Another live run writes the same `--output_dir` / `--output_name`."""

    exit_code = EXIT_OUTPUT_IN_USE


class ProcessLostError(RunStopped):
    """With several processes, another one stopped, hung past the collective timeout or became unreachable: this
    one stops too, with one line, instead of waiting for ever."""

    exit_code = EXIT_PROCESS_LOST

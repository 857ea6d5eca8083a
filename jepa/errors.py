"""User-facing errors.

Every error a user can cause (a bad recipe, a missing file, an infeasible mask configuration) is a
:class:`JepaError`. The CLI prints its message as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class JepaError(Exception):
    """An error caused by input (recipe, data, checkpoint), reported as one clear line."""

    exit_code = 1


class RecipeError(JepaError):
    """A recipe is invalid. Holds one ``section.field: message`` line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        # Problems echo user text; a control character in it (a stray newline, \x1e) must not break
        # the one-line-per-problem report, so it is shown escaped.
        self.problems = [_printable(p) for p in problems]
        super().__init__("\n".join(self.problems))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PluginError(JepaError):
    """A plugin is missing, broken, or registers a name that another plugin already owns."""


class MaskConfigError(RecipeError):
    """A masker cannot produce valid masks on the requested token grid."""


class SampleError(Exception):
    """A single data sample cannot be decoded. Not fatal: the sample is skipped and counted.

    Args:
        reason: a short, stable category (``"corrupt"``, ``"empty"``, ``"too_large"``...) used as
            the counter name in the run summary.
        detail: free text for the log.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class CheckpointError(JepaError):
    """A checkpoint is missing, incomplete, or does not match the run."""


class TrainingStopped(JepaError):
    """Training stopped on purpose before its end: a signal, repeated non-finite steps, or the collapse
    alarm with ``health.collapse = "stop"``. The message names the step and the checkpoint to resume from.

    Args:
        message: the one-line report.
        exit_code: the process exit status (128 + signal number for a signal, as shells report it).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

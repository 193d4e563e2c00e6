"""The errors raygpt reports to a person as one line (bad config, input, run file, checkpoint, job, storage).

    raygpt train configs/demo.yaml data.seq_len=true   →   raygpt: error: data.seq_len: expected int, got a boolean

Its own module, free of heavy imports, so that the CLI can catch these errors without importing the stages.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is one line for the user; `raygpt` prints it and exits with status 2."""


class RunFileError(UserError, ValueError):
    """A file of the run that is missing, corrupt or in the way; the message is one line for the user."""


class StorageError(RunFileError):
    """Object storage that cannot be used: one line naming the location and what is wrong."""


ECHO_LIMIT = 100
"""Characters of a user's value echoed in an error line; a longer value is cut (a 5 MB string is not echoed whole)."""


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` for an error line, cut to about `limit` characters with the full length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def one_line(error: BaseException, limit: int = 120) -> str:
    """An exception's first line, cut to `limit` characters (its type when it has no message)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def user_error(error: BaseException) -> BaseException | None:
    """The user error (bad config, input or checkpoint) behind an exception, also when it was raised inside a Ray task
    or actor (Ray keeps it as `.cause`). Ray's own wrapper of it (`RayTaskError(DataError)`, an instance of both whose
    message is Ray's traceback) is passed over for the error itself."""
    seen: BaseException | None = error
    found = None
    for _ in range(32):
        if seen is None:
            break
        if isinstance(seen, UserError):
            found = seen
            if not type(seen).__module__.startswith("ray."):
                return seen
        failures = getattr(seen, "worker_failures", None)  # Ray Train's WorkerGroupError: each rank's own error
        if isinstance(failures, dict):
            inner = [user_error(e) for e in failures.values() if isinstance(e, BaseException)]
            if (first := next((e for e in inner if e is not None), None)) is not None:
                return first
        # Ray keeps a task's error as `.cause`, Ray Train a worker's as `._base_exc`
        seen = seen.__cause__ or getattr(seen, "cause", None) or getattr(seen, "_base_exc", None)
    return found


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (`raise ... from`, and Ray's `.cause` of a task or actor error)."""
    seen = error
    for _ in range(32):
        inner = seen.__cause__ or getattr(seen, "cause", None)
        if not isinstance(inner, BaseException):
            break
        seen = inner
    return seen


class StageFailed(Exception):
    """A stage that failed for a reason other than the user's input (a worker died, a bug): the CLI prints one line
    naming the stage, the step and the log holding the whole traceback."""

    def __init__(self, stage: str, step: int | None) -> None:
        super().__init__(f"stage {stage} failed" + (f" at step {step}" if step is not None else ""))
        self.stage, self.step = stage, step

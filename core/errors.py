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

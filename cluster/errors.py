"""The base of every error raygpt reports to a person as one line (bad config, input, checkpoint, job, storage).

    raygpt train configs/demo.yaml data.seq_len=true   →   raygpt: error: data.seq_len: expected int, got a boolean

Its own module, free of heavy imports, so that the CLI can catch these errors without importing the stages.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is one line for the user; `raygpt` prints it and exits with status 2."""

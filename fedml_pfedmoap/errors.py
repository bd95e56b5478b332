"""User errors: bad input (config, data, partition, checkpoint) that the command line reports as one line.

Every error a user can fix by changing their input derives from ``UserError``; its message names the key or file and
what was expected. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; ``str(err)`` is the whole message (no traceback needed)."""


class ConfigError(UserError, ValueError):
    """A config file or key is malformed; the message names the key and what was expected."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written (non-plain state) or read (corrupt, foreign, unknown format)."""


class UnknownNameError(UserError, KeyError):
    """A name (algorithm, dataset, partition method) is not registered; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

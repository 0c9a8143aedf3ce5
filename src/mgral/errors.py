"""The small exception hierarchy of mgral.

Library code raises these (chained with ``raise ... from err``); only the CLI turns them
into exit codes. Messages say what was expected, what came, where, and how to fix it.
"""


class MgralError(Exception):
    """Base class of every error mgral raises on purpose."""


class ConfigError(MgralError):
    """An invalid configuration value or command-line argument."""


class DatasetError(MgralError):
    """Bad dataset input: unreadable file, malformed annotation, invalid box, missing image."""


class CheckpointError(MgralError):
    """A checkpoint or weights file that is missing, corrupt, or made for another model."""


class PoolError(MgralError):
    """A pool-ledger operation that breaks its rules, or a corrupt ledger file."""


class RunError(MgralError):
    """A run directory that is in use, corrupt, or was started with another config."""


class TrackingError(MgralError):
    """An experiment-tracking store (MLflow) that refused a write or could not be reached; the
    run's own files are intact, and the next sync logs what this one did not."""


class DiskFullError(MgralError):
    """No space (or quota) left on the file system an output goes to. Raised by the atomic
    writers, so the file being written is left as it was before."""


class WaitingForModel(MgralError):
    """A cycle of a run whose model trains outside mgral (detector kind ``predictions``)
    needs that model's results file, which is not there yet. Nothing is lost: run the command
    again once the file is written."""

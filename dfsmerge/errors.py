"""User-facing errors. Every message names the field, the value and the fix; the CLI prints it on one line
and exits with status 2 (never a traceback)."""


class DfsmergeError(Exception):
    """Base class of errors caused by user input (configs, paths, checkpoints)."""


class ConfigError(DfsmergeError):
    """A config file or CLI value is invalid."""


class CheckpointError(DfsmergeError):
    """A model checkpoint is missing, unreadable or inconsistent."""


class ArchitectureError(DfsmergeError):
    """A model's architecture is unsupported or incompatible with the others."""


class MergeError(DfsmergeError):
    """A merge method got inputs it cannot merge."""


class OutputExistsError(DfsmergeError):
    """The output directory exists and ``--force`` was not given."""

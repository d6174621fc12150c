"""The lake's errors: each message names the table, file or key and what to do."""

from __future__ import annotations


class LakeError(RuntimeError):
    """A lake operation that cannot go on; the message says which table and what to do."""


class SchemaMismatchError(LakeError):
    pass


class ConflictError(LakeError):
    """Another writer committed to the table first; nothing of this write was committed."""


class TableMissingError(LakeError):
    pass


class ArtifactError(LakeError):
    """A model or tokenizer that is missing, mismatched or altered; the message names the command
    that makes one."""

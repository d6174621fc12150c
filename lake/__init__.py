"""The layer both halves stand on: Delta tables, the chunk store, artifacts, filesystems, the recipe.

Nothing here imports ``jobs``, ``trainer`` or ``quality_models`` (an import-linter contract in
``pyproject.toml`` checks it).
"""

from lake.errors import ArtifactError, ConflictError, LakeError, SchemaMismatchError, TableMissingError
from lake.tables import Lake

__all__ = ["ArtifactError", "ConflictError", "Lake", "LakeError", "SchemaMismatchError", "TableMissingError"]

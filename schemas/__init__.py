"""Table definitions of the lake: one per table, Arrow first, Spark derived (``schemas.spark``)."""

from schemas.tables import TABLES, Table, UnknownTableError, table
from schemas.arrow import arrow_differences, conform

__all__ = ["TABLES", "Table", "UnknownTableError", "table", "arrow_differences", "conform"]

"""Table definitions of the lake: one per table, Arrow first, Spark derived (``schemas.spark``)."""

from schemas.tables import SPAN_TYPE, TABLES, Table, UnknownTableError, chunk_row_schema, table
from schemas.arrow import added_columns, arrow_differences, conform

__all__ = ["SPAN_TYPE", "TABLES", "Table", "UnknownTableError", "chunk_row_schema", "table", "added_columns", "arrow_differences", "conform"]

"""Checking Arrow data against a table's definition (the trainer's and the bridge's side)."""

from __future__ import annotations

import pyarrow as pa

from schemas.tables import Table


def arrow_differences(table: Table, actual: pa.Schema) -> list[str]:
    """Every way ``actual`` differs from the table's definition, in words; empty when it fits."""
    problems = []
    for field in table.schema:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            problems.append(f"column {field.name!r} is missing (expected {field.type})")
            continue
        got = actual.field(idx).type
        if not _castable_without_loss(got, field.type):
            problems.append(f"column {field.name!r} has type {got}, expected {field.type}")
    for name in actual.names:
        if table.schema.get_field_index(name) < 0:
            problems.append(f"column {name!r} ({actual.field(name).type}) is not in the table's definition")
    return problems


def added_columns(table: Table, actual: pa.Schema) -> list[pa.Field]:
    """The nullable columns of the definition that ``actual`` lacks: what a table written before the
    definition gained them needs added (its old rows read them as null) to take today's rows."""
    return [f for f in table.schema if f.nullable and actual.get_field_index(f.name) < 0]


def conform(table: Table, data: pa.Table) -> pa.Table:
    """``data`` with the table's column order and exact types; raises ValueError on any difference."""
    problems = arrow_differences(table, data.schema)
    if problems:
        raise ValueError(f"data does not fit table {table.name!r}: " + "; ".join(problems))
    columns = [data.column(f.name).cast(f.type) for f in table.schema]
    return pa.Table.from_arrays(columns, schema=table.schema)


def _castable_without_loss(got: pa.DataType, want: pa.DataType) -> bool:
    if got.equals(want):
        return True
    if pa.types.is_null(got):
        return True
    # Same family, different width or string flavour, as Arrow producers differ on these.
    if pa.types.is_string(want) and (pa.types.is_string(got) or pa.types.is_large_string(got)):
        return True
    if pa.types.is_int64(want) and pa.types.is_integer(got):
        return True
    if pa.types.is_float64(want) and (pa.types.is_floating(got) or pa.types.is_integer(got)):
        return True
    if pa.types.is_timestamp(want) and pa.types.is_timestamp(got):
        return got.tz is not None
    if pa.types.is_list(want) and (pa.types.is_list(got) or pa.types.is_large_list(got)):
        return _castable_without_loss(got.value_type, want.value_type)
    if pa.types.is_map(want) and pa.types.is_map(got):
        return _castable_without_loss(got.key_type, want.key_type) and _castable_without_loss(
            got.item_type, want.item_type
        )
    return False

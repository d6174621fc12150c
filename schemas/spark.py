"""Spark's view of the table definitions in ``schemas.tables``, derived, never declared twice."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import types as T

from schemas.tables import Table


def spark_type(dtype: pa.DataType) -> T.DataType:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return T.StringType()
    if pa.types.is_int64(dtype):
        return T.LongType()
    if pa.types.is_int32(dtype):
        return T.IntegerType()
    if pa.types.is_float64(dtype):
        return T.DoubleType()
    if pa.types.is_float32(dtype):
        return T.FloatType()
    if pa.types.is_boolean(dtype):
        return T.BooleanType()
    if pa.types.is_timestamp(dtype):
        return T.TimestampType()
    if pa.types.is_map(dtype):
        return T.MapType(spark_type(dtype.key_type), spark_type(dtype.item_type), True)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return T.ArrayType(spark_type(dtype.value_type), True)
    if pa.types.is_struct(dtype):
        return T.StructType([T.StructField(f.name, spark_type(f.type), f.nullable) for f in dtype])
    raise TypeError(f"no Spark type for Arrow type {dtype}")


def spark_schema(table: Table) -> T.StructType:
    return T.StructType(
        [T.StructField(f.name, spark_type(f.type), f.nullable) for f in table.schema]
    )


def schema_differences(table: Table, actual: T.StructType) -> list[str]:
    """Every way ``actual`` differs from the table's definition, in words; empty when it fits.

    Nullability is not compared: Spark marks most computed columns nullable.
    """
    expected = {f.name: f.dataType for f in spark_schema(table).fields}
    got = {f.name: f.dataType for f in actual.fields}
    problems = []
    for name, dtype in expected.items():
        if name not in got:
            problems.append(f"column {name!r} is missing (expected {dtype.simpleString()})")
        elif not _same_type(got[name], dtype):
            problems.append(
                f"column {name!r} has type {got[name].simpleString()}, expected {dtype.simpleString()}"
            )
    for name, dtype in got.items():
        if name not in expected:
            problems.append(f"column {name!r} ({dtype.simpleString()}) is not in the table's definition")
    return problems


def _same_type(a: T.DataType, b: T.DataType) -> bool:
    # Compare by shape, ignoring the nullability flags nested inside maps, arrays and structs.
    if isinstance(a, T.MapType) and isinstance(b, T.MapType):
        return _same_type(a.keyType, b.keyType) and _same_type(a.valueType, b.valueType)
    if isinstance(a, T.ArrayType) and isinstance(b, T.ArrayType):
        return _same_type(a.elementType, b.elementType)
    if isinstance(a, T.StructType) and isinstance(b, T.StructType):
        return [f.name for f in a.fields] == [f.name for f in b.fields] and all(
            _same_type(x.dataType, y.dataType) for x, y in zip(a.fields, b.fields)
        )
    if isinstance(a, (T.TimestampType, T.TimestampNTZType)) and isinstance(b, T.TimestampType):
        return isinstance(a, T.TimestampType)
    return a == b

"""Arrow schema of the index's signatures table (one row per LoRA) and a function to conform to it.

The ``direction`` column may be ``list<float32>`` or ``list<float64>``: it keeps the dtype it was
written with, so importing a table (e.g. the published reference, float64) is lossless.
"""

from __future__ import annotations

import pyarrow as pa

# Columns that must be present and non-null in every row; every other column is nullable and is
# added as all-null when missing.
REQUIRED_COLUMNS = ("lora_id", "direction", "strength", "consistency")
DIRECTION_VALUE_TYPES = (pa.float32(), pa.float64())


def signature_schema(direction_type: pa.DataType = pa.float64()) -> pa.Schema:
    """The signatures schema with ``direction: list<direction_type>`` (float32 or float64)."""
    if direction_type not in DIRECTION_VALUE_TYPES:
        raise ValueError(f"direction_type must be float32 or float64, got {direction_type}")
    return pa.schema(
        [
            pa.field("lora_id", pa.string(), nullable=False),
            pa.field("name", pa.string()),
            pa.field("description", pa.string()),
            pa.field("trigger_words", pa.list_(pa.string())),
            pa.field("source_path", pa.string()),
            pa.field("source_url", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("format", pa.string()),
            pa.field("rank", pa.int32()),
            pa.field("direction", pa.list_(direction_type), nullable=False),
            pa.field("strength", pa.float64(), nullable=False),
            pa.field("consistency", pa.float64(), nullable=False),
            pa.field("n", pa.int64()),
            pa.field("strength_std", pa.float64()),
            # standard errors (carlos_ray.uncertainty) and the adaptive rounds the signature used (null: unknown)
            pa.field("direction_se", pa.float64()),
            pa.field("direction_rse", pa.float64()),
            pa.field("strength_se", pa.float64()),
            pa.field("consistency_se", pa.float64()),
            pa.field("n_rounds", pa.int32()),
            pa.field("category_names", pa.list_(pa.string())),
            pa.field("category_strength", pa.list_(pa.float64())),
            pa.field("category_within", pa.list_(pa.float64())),
            pa.field("config_hash", pa.string()),
            pa.field("civitai_model_id", pa.int64()),
            pa.field("civitai_version_id", pa.int64()),
            pa.field("download_count", pa.int64()),
            pa.field("indexed_at", pa.string()),
        ]
    )


SIGNATURE_SCHEMA = signature_schema(pa.float64())


def _direction_value_type(column: pa.ChunkedArray) -> pa.DataType:
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ValueError(f"column 'direction' must be a list of float32 or float64, got {t}")
    if t.value_type not in DIRECTION_VALUE_TYPES:
        raise ValueError(
            f"column 'direction' must hold float32 or float64 values, got {t.value_type}; "
            "cast it explicitly if a lossy conversion is intended"
        )
    return t.value_type


def conform_signatures(table: pa.Table) -> pa.Table:
    """Return ``table`` with exactly the signature columns, in schema order and schema types.

    Missing nullable columns are added as nulls; ``direction`` keeps its float32/float64 value
    type (a large or fixed-size list becomes a plain list). Raises ``ValueError`` naming the
    column for: a missing required column, an unknown column, a type that does not cast safely,
    or a null in a required column.
    """
    if not isinstance(table, pa.Table):
        raise ValueError(f"expected a pyarrow.Table, got {type(table).__name__}")
    names = table.column_names
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        raise ValueError(f"duplicate column names: {duplicated}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"signatures table is missing required column(s) {missing}; has {names}")
    schema = signature_schema(_direction_value_type(table["direction"]))
    unknown = [c for c in names if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown} in signatures table; valid columns: {schema.names}")

    columns = []
    for field in schema:
        if field.name not in names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table[field.name]
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name!r} has {column.null_count} null value(s); it is required")
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(
                    f"column {field.name!r} has type {column.type}, which does not cast safely to {field.type}: {e}"
                ) from e
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)

"""A Parquet batch's NDJSON read into an Arrow table in one pass of the compiled reader
(``_columns.pyx``), where that gives what pyarrow's JSON reader would give; None sends
the batch to pyarrow's reader.

pyarrow's reader parses each value twice (into text, then into its type), and took
three fifths of a batch's conversion; this reader builds the columns' buffers as it
parses, and the arrays are made from them without a copy. Its twin,
``_columns_py.py``, is the specification the tests hold it to; as Python it is many
times slower than pyarrow's reader, so without the compiled core (see ``compat``)
pyarrow's reader reads every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastingest._columns_py import BOOL, DOUBLE, INT, LIST, NULL, STRING
from fastingest.compat import USE_EXTENSIONS

if TYPE_CHECKING:
    import pyarrow as pa

    from fastingest._columns_py import Column

    Found = tuple[tuple[int, int, int], tuple[Column, ...]]

read: Callable[[bytes, int, int, int], Found | None] | None = None
if USE_EXTENSIONS:
    from fastingest._columns import read


def read_table(
    batch: bytes, max_fields: int, cells_per_value: int, free_cells: int
) -> tuple[tuple[int, int, int], pa.Table] | None:
    """((lines, field paths, values) as ``split.shape`` counts them, the table), or None
    where pyarrow's reader must read the batch. Reading stops, with None, once the
    batch has more than `max_fields` paths or more null slots than `cells_per_value`
    times its values plus `free_cells`."""
    if read is None:
        return None
    return to_table(read(batch, max_fields, cells_per_value, free_cells))


def to_table(found: Found | None) -> tuple[tuple[int, int, int], pa.Table] | None:
    """What either twin's read() found, as a table (None where it is none)."""
    import pyarrow as pa

    if found is None:
        return None
    measured, columns = found
    if not columns:  # no line has a field: pyarrow's reader says why that cannot be a row
        return None
    arrays = [_array(c) for c in columns]
    return measured, pa.Table.from_arrays(arrays, names=[c[0] for c in columns])


def _array(column: Column) -> pa.Array:
    import pyarrow as pa

    _, kind, length, nulls, validity, values, offsets, children = column
    valid = None if validity is None else pa.py_buffer(validity)
    if kind == NULL:
        return pa.nulls(length)
    if kind in (BOOL, INT, DOUBLE):
        kind_type = pa.bool_() if kind == BOOL else pa.int64() if kind == INT else pa.float64()
        return pa.Array.from_buffers(kind_type, length, [valid, pa.py_buffer(values)], nulls)
    if kind == STRING:
        buffers = [valid, pa.py_buffer(offsets), pa.py_buffer(values)]
        return pa.Array.from_buffers(pa.string(), length, buffers, nulls)
    inner = [_array(c) for c in children]
    if kind == LIST:
        list_type = pa.list_(inner[0].type)
        return pa.Array.from_buffers(
            list_type, length, [valid, pa.py_buffer(offsets)], nulls, children=inner
        )
    fields = [pa.field(c[0], a.type) for c, a in zip(children, inner, strict=True)]
    return pa.Array.from_buffers(pa.struct(fields), length, [valid], nulls, children=inner)


__all__ = ["read_table", "to_table"]

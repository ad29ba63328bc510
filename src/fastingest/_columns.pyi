"""Types of the compiled column reader; ``_columns_py.py`` is its specification."""

from fastingest._columns_py import Column

def read(
    batch: bytes, max_fields: int, cells_per_value: int, free_cells: int
) -> tuple[tuple[int, int, int], tuple[Column, ...]] | None: ...

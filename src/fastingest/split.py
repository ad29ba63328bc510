"""Selects the collection splitter: the compiled one, or its pure-Python twin (see
``compat``)."""

from __future__ import annotations

from fastingest.compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from fastingest._split import field_groups, field_values, members_unique, shape, split_payloads
else:
    from fastingest._split_py import (
        field_groups,
        field_values,
        members_unique,
        shape,
        split_payloads,
    )

__all__ = ["field_groups", "field_values", "members_unique", "shape", "split_payloads"]

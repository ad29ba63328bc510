"""NDJSON batches -> Parquet objects (``--format parquet``), and the payloads that do not fit.

A closed batch's NDJSON is read in one block, so the schema is inferred from the
whole batch (or fixed by ``--schema``), and written as one Parquet file: zstd (or
snappy, gzip, none) pages, no compression around the file, timestamps in
microseconds, row groups of at most ``ROW_GROUP_ROWS``. Without a schema, the
compiled reader (``columns``) reads it where it gives what pyarrow's JSON reader
would, as nearly every batch; pyarrow's reader reads the rest. It runs in the seal
threads, never on the event loop; both readers drop the GIL.

A payload that does not fit (not an object, a type other than the schema's or the
rest of the batch's, a field the schema lacks, an integer past 64 bits) is never
dropped: it goes, with the reason, to an NDJSON object under ``REJECTS_PREFIX``.
The misfits are found by halving a failing block until each misfit stands alone,
so a batch with k of them costs about k * log2(n) extra reads, and none when
every payload fits. Without a schema, a batch is first measured (by the compiled
reader, or the splitter's ``split.shape`` where that reader leaves the batch to
pyarrow's): one too sparse to read whole (ever new field names) keeps only the
payloads that leave its table dense, and the others are misfits too.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fastingest.bodies import DIGITS_AS_ZERO, LONG_DIGIT_RUN
from fastingest.columns import read_table
from fastingest.split import shape

if TYPE_CHECKING:
    import pyarrow as pa

REJECTS_PREFIX = "format-conversion-failed/"
ROW_GROUP_ROWS = 65_536
PAGE_COMPRESSIONS = ("zstd", "snappy", "gzip", "none")
# A column whose distinct values outgrow this is written plain: ids and free text cost
# more to dictionary-encode than they save; "type"-like columns stay dictionaries.
DICTIONARY_PAGE_BYTES = 16 * 1024
_TWO_63 = float(1 << 63)
# Without a schema, the reader gives every row a slot in every column a batch has, so a
# batch of payloads with ever new field names would cost rows x fields: a few MiB of them,
# minutes and gigabytes. A batch is read whole while its table stays within these bounds.
MAX_FIELDS = 4_096  # field paths (nested ones and arrays' elements included)
CELLS_PER_VALUE = 8  # rows x fields per value the batch holds ...
FREE_CELLS = 1 << 20  # ... plus these
_TABLE_BOUNDS = (MAX_FIELDS, CELLS_PER_VALUE, FREE_CELLS)
EMPTY_GROUP = "an object with no member, and none in the batch has one: Parquet cannot store it"
INSTALL_HINT = "--format parquet needs pyarrow: pip install 'fastingest[parquet]'"

_BEFORE_NUMBER = frozenset(b":,[-")  # what can precede an integer token, blanks aside
_INT64 = (-(1 << 63), (1 << 63) - 1)


def require_pyarrow() -> None:
    """ValueError, saying how to install it, when pyarrow is missing."""
    try:
        import pyarrow.json
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None


# --- the schema file -------------------------------------------------------------------

_SCALARS = {
    "bool": "bool_",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "float32": "float32",
    "float64": "float64",
    "string": "string",
}


def load_schema(path: Path) -> pa.Schema:
    """Read a ``--schema`` file: ``{"fields": [{"name", "type", "nullable"?}, ...]}``.

    A type is a name (bool, int8-64, uint8-64, float32, float64, string, date,
    timestamp: RFC 3339 strings, stored as microseconds UTC), ``{"list": TYPE}``
    or ``{"struct": [fields]}``. Raises ValueError, naming the file's fault.
    """
    import pyarrow as pa

    try:
        spec = orjson.loads(path.read_bytes())
        fields = spec.get("fields") if isinstance(spec, dict) else None
        if not isinstance(fields, list) or not fields:
            raise ValueError('expected {"fields": [{"name": ..., "type": ...}, ...]}')
        return pa.schema(_fields(fields, "$"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--schema {path}: {exc}") from None


def _fields(fields: list[Any], at: str) -> list[pa.Field]:
    import pyarrow as pa

    out = []
    names = set()
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "type" not in f:
            raise ValueError(f"{at}: each field needs a string name and a type, got {f!r}")
        name = f["name"]
        if name in names:
            raise ValueError(f"{at}: field {name!r} is named twice")
        names.add(name)
        out.append(pa.field(name, _type(f["type"], f"{at}.{name}"), f.get("nullable", True)))
    return out


def _type(spec: Any, at: str) -> pa.DataType:
    import pyarrow as pa

    if isinstance(spec, str):
        if spec == "timestamp":
            return pa.timestamp("us", tz="UTC")
        if spec in _SCALARS:
            return getattr(pa, _SCALARS[spec])()
    elif isinstance(spec, dict) and len(spec) == 1:
        if "list" in spec:
            return pa.list_(_type(spec["list"], f"{at}[]"))
        if "struct" in spec and isinstance(spec["struct"], list):
            if not spec["struct"]:
                raise ValueError(f"{at}: a struct needs a field (Parquet has no empty group)")
            return pa.struct(_fields(spec["struct"], at))
    known = ", ".join([*_SCALARS, "timestamp"])
    raise ValueError(f"{at}: unknown type {spec!r} (one of {known}, {{list}}, {{struct}})")


# --- conversion -------------------------------------------------------------------------


class ParquetWriter:
    """Turns a batch's NDJSON into a Parquet body and the lines that did not fit.

    Thread-safe: it holds only settings.
    """

    def __init__(self, compression: str, schema: pa.Schema | None = None) -> None:
        require_pyarrow()
        if compression not in PAGE_COMPRESSIONS:
            raise ValueError(f"unknown Parquet compression {compression!r}")
        self.compression = compression
        self.schema = schema
        # A uint64 column reads integers past the signed range as integers: the text decides.
        self._unsigned = schema is not None and any(_holds_uint64(f.type) for f in schema)

    def convert(self, data: bytes) -> tuple[bytes, int, list[tuple[bytes, str]]]:
        """(Parquet body, or b"" when no line fits; rows in it; [(line, why it did not fit)]).

        `data` is the batch's NDJSON. When every line fits, as nearly always, it is read
        in one go; only then are lines looked at one by one.
        """
        import pyarrow as pa

        lines: list[bytes] = []
        sparse: list[tuple[bytes, str]] = []
        table = None
        if self.schema is None:
            read = read_table(data, *_TABLE_BOUNDS)
            measured = read[0] if read is not None else shape(data, MAX_FIELDS)
            if not _dense(measured):
                lines = [ln + b"\n" for ln in data.split(b"\n")[:-1]]
                sparse = _too_sparse(lines)
            elif read is not None:
                table = read[1]
        if not sparse:
            try:
                # The compiled reader leaves an integer past int64 to pyarrow's: only a
                # table pyarrow read may hold one, as a float.
                exact = table is not None
                if table is None:
                    table = _read_json(data, self.schema)
                    exact = not self._unsigned and _no_long_integers(table)
                if table.num_columns and _writable(table.schema) and exact:
                    return self._write([table], self.schema), table.num_rows, []
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                pass
        suspects = _long_integer_lines(data)
        lines = lines or [ln + b"\n" for ln in data.split(b"\n")[:-1]]
        rejects = sparse
        left_out = _lines_of(sparse)
        fitting = []
        for line in lines:
            if line in left_out:
                continue
            if line in suspects and (why := _precheck(line)):
                rejects.append((line, why))
            else:
                fitting.append(line)
        schema = self.schema
        tables: list[pa.Table] = []
        if fitting and schema is None:
            bad: list[tuple[bytes, str]] = []
            self._read(fitting, None, tables, bad)
            if bad or len(tables) > 1:  # misfits, or runs of differing types
                rejects += bad
                misfits = _lines_of(bad)
                fitting = [ln for ln in fitting if ln not in misfits]
                schema = _unified([t.schema for t in tables]) if tables else None
                tables = []
        if fitting and not tables:
            self._read(fitting, schema, tables, rejects)
        rejects = _in_order(rejects, lines)
        if not tables:
            return b"", 0, rejects
        return self._write(tables, schema), sum(t.num_rows for t in tables), rejects

    def _read(
        self,
        lines: list[bytes],
        schema: pa.Schema | None,
        tables: list[pa.Table],
        rejects: list[tuple[bytes, str]],
    ) -> None:
        """Read `lines` as a table into `tables`; a failing block is halved until each line
        that does not fit stands alone (into `rejects`, with the reader's reason)."""
        import pyarrow as pa

        stack = [lines]
        while stack:
            block = stack.pop()
            try:
                data = b"".join(block)
                read = None if schema is not None else read_table(data, *_TABLE_BOUNDS)
                table = read[1] if read is not None else _read_json(data, schema)
                if not table.num_columns:  # a file with no column keeps no row
                    raise pa.ArrowInvalid("an object with no field: a Parquet row needs one")
                if not _writable(table.schema):
                    raise pa.ArrowInvalid(EMPTY_GROUP)
                tables.append(table)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                if len(block) == 1:
                    rejects.append((block[0], _reason(block[0], exc)))
                    continue
                half = len(block) // 2
                stack += [block[half:], block[:half]]  # the first half is read first

    def _write(self, tables: list[pa.Table], schema: pa.Schema | None) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if schema is not None:
            tables = [t if t.schema.equals(schema) else _conform(t, schema) for t in tables]
        table = (
            tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        )
        out = io.BytesIO()
        pq.write_table(
            table,
            out,
            compression=self.compression if self.compression != "none" else None,
            row_group_size=ROW_GROUP_ROWS,
            dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES,
            coerce_timestamps="us",
            allow_truncated_timestamps=False,
        )
        return out.getvalue()


def _writable(schema: pa.Schema) -> bool:
    """Whether Parquet can store every column: it has no group without a field, so an
    object with no member, where no other row of the batch gives it one, cannot be."""
    import pyarrow as pa

    def writable(kind: pa.DataType) -> bool:
        if pa.types.is_struct(kind):
            fields = [kind.field(i).type for i in range(kind.num_fields)]
            return bool(fields) and all(map(writable, fields))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return writable(kind.value_type)
        return True

    return all(writable(f.type) for f in schema)


def _unified(schemas: list[pa.Schema]) -> pa.Schema:
    """Every field of the runs read, typed as it was first read, widened by each later run
    whose type for it unifies; the rows of a run whose type does not are read again
    against it, and those that do not fit are rejected (only they: their other fields
    are in the schema too)."""
    import pyarrow as pa

    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            have = fields.setdefault(field.name, field)
            if have is field:
                continue
            try:
                wider = pa.unify_schemas(
                    [pa.schema([have]), pa.schema([field])], promote_options="permissive"
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                continue
            fields[field.name] = wider.field(0)
    return pa.schema(list(fields.values()))


def _read_json(data: bytes, schema: pa.Schema | None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.json as pj

    table = pj.read_json(
        io.BytesIO(data),
        read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
        parse_options=pj.ParseOptions(
            explicit_schema=schema,
            unexpected_field_behavior="error" if schema is not None else "infer",
            newlines_in_values=False,
        ),
    )
    try:
        table.validate(full=True)
    except pa.ArrowInvalid:
        if schema is not None:
            raise
        # Inference can mislay a list's leading nulls (apache/arrow#51305): the offsets
        # count them, the values lack them. Read against the inferred types, it cannot.
        return _read_json(data, table.schema)
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns, in its order; a column it lacks is all nulls."""
    import pyarrow as pa

    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _no_long_integers(table: pa.Table) -> bool:
    """True if no integer past 64 bits was read as a float: every such integer reads as
    a float of magnitude 2**63 or more, so floats below that prove there was none.
    Otherwise (a float that large, maybe sent as one) the text is checked line by line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def small(values: pa.Array) -> bool:
        kind = values.type
        if pa.types.is_floating(kind):
            top = pc.max(pc.abs(values)).as_py()
            return top is None or top < _TWO_63
        if pa.types.is_struct(kind):
            return all(small(values.field(i)) for i in range(kind.num_fields))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return small(values.flatten())
        return True

    return all(small(chunk) for column in table.columns for chunk in column.chunks)


def _dense(measured: tuple[int, int, int] | None) -> bool:
    """Whether a batch of (lines, field paths, values) becomes a table in about the work
    its values take: the reader gives every row a slot in every column."""
    if measured is None:  # a line that is not JSON: read line by line
        return False
    rows, fields, values = measured
    return fields <= MAX_FIELDS and rows * fields <= CELLS_PER_VALUE * values + FREE_CELLS


def _too_sparse(lines: list[bytes]) -> list[tuple[bytes, str]]:
    """The lines to leave out of a batch too sparse to read whole, with the reason. Each
    distinct line, in order of first sight, is kept (with its repeats) while the table of
    those kept stays dense; misfits are told apart by content, so repeats share a fate."""
    fields: set[tuple[Any, ...]] = set()
    rows = values = 0
    why: dict[bytes, str] = {}
    for line, times in Counter(lines).items():
        try:
            payload = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the reader rejects it with its own reason
        mine: set[tuple[Any, ...]] = set()
        count = _paths(payload, (), mine) * times
        width = len(fields) + len(mine - fields)
        if (
            width > MAX_FIELDS
            or (rows + times) * width > CELLS_PER_VALUE * (values + count) + FREE_CELLS
        ):
            why[line] = (f"too sparse for columns: with it the batch has {width} fields "
                         f"over {rows + times} rows (give a --schema)")  # fmt: skip
            continue
        fields |= mine
        rows += times
        values += count
    return [(line, why[line]) for line in lines if line in why]


def _paths(value: Any, path: tuple[Any, ...], into: set[tuple[Any, ...]]) -> int:
    """Add the field paths under `value` to `into` (as ``split.shape`` counts them); the
    values it holds, itself included."""
    count = 1
    if isinstance(value, dict):
        for name, inner in value.items():
            member = (*path, name)
            into.add(member)
            count += _paths(inner, member, into)
    elif isinstance(value, list) and value:
        items = (*path, None)  # an array's elements: no name (JSON names are strings)
        into.add(items)
        for inner in value:
            count += _paths(inner, items, into)
    return count


def _holds_uint64(kind: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return any(_holds_uint64(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind):
        return _holds_uint64(kind.value_type)
    return bool(pa.types.is_uint64(kind))


def _long_integer_lines(data: bytes) -> set[bytes]:
    """The lines of `data` with a digit run that may be an integer past 64 bits (the
    reader would make it a double), to be checked exactly; usually none. A run inside
    a string (a hex id) is skipped unless it follows what can precede a number."""
    found = set()
    marked = data.translate(DIGITS_AS_ZERO)  # as bodies.py finds them: one C pass
    at = marked.find(LONG_DIGIT_RUN)
    while at >= 0:
        before = at - 1
        while before >= 0 and data[before] in b" \t\r":
            before -= 1
        if before >= 0 and data[before] in _BEFORE_NUMBER:
            start = data.rfind(b"\n", 0, at) + 1
            found.add(data[start : data.index(b"\n", at) + 1])
        end = marked.find(b".", at)
        at = marked.find(LONG_DIGIT_RUN, end) if end >= 0 else -1
    return found


class _OutOfRange(Exception):
    pass


def _int64(text: str) -> int:
    value = int(text) if len(text) <= 20 else _INT64[1] + 1
    if not _INT64[0] <= value <= _INT64[1]:
        raise _OutOfRange
    return value


def _precheck(line: bytes) -> str:
    """Why `line`, with a long digit run, cannot be a row; "" if it may be one."""
    try:
        json.loads(line, parse_int=_int64)  # exact integers, as bodies.py checks them
    except _OutOfRange:
        return "an integer outside the 64-bit range"
    return ""


def _reason(line: bytes, exc: Exception) -> str:
    if not line.lstrip().startswith(b"{"):
        return "not a JSON object: a Parquet row is an object"
    text = str(exc).removeprefix("JSON parse error: ")
    if "list offsets" in text:  # an invalid table: pyarrow's reader and a list of nulls
        return "a list of nulls, which pyarrow's JSON reader misreads (apache/arrow#51305)"
    return text.replace(" in row 0", "")


def _lines_of(rejects: list[tuple[bytes, str]]) -> set[bytes]:
    return {line for line, _ in rejects}


def _in_order(rejects: list[tuple[bytes, str]], lines: list[bytes]) -> list[tuple[bytes, str]]:
    """`rejects` in the batch's order, so a replay writes the same error object."""
    if len(rejects) < 2:
        return rejects
    why: dict[bytes, str] = {}
    for line, reason in rejects:
        why.setdefault(line, reason)
    return [(ln, why[ln]) for ln in lines if ln in why]


def reject_line(line: bytes, reason: str) -> bytes:
    """One line of the error object: the reason and the payload as it was sent."""
    return b'{"error":' + orjson.dumps(reason) + b',"payload":' + line.rstrip(b"\n") + b"}\n"

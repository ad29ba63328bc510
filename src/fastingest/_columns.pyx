# cython: language_level=3
"""An NDJSON batch read into Arrow column buffers in one pass: the compiled twin of
``_columns_py.py``, which is the specification (what is read, and when None sends the
batch to pyarrow's JSON reader).

Each field path is a node holding its column as Arrow lays it out: a validity byte
per slot (packed into a bitmap at the end), values (int64, double, a byte per bool,
string bytes) and offsets (strings, lists). A struct's children get one slot per
struct slot; a list's one element node gets a slot per element. The walk takes no
Python object and runs with the GIL released, as pyarrow's reader does: a batch is
megabytes, and the event loop runs meanwhile.
"""

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport isinf
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport calloc, free, realloc, strtod
from libc.string cimport memchr, memcpy, memset

from fastingest._scan cimport _PLAIN, _hex4, _utf8, _ws, cstr

cdef enum:
    K_NULL = 0  # no value but null seen yet
    K_BOOL = 1
    K_INT = 2
    K_DOUBLE = 3
    K_STRING = 4
    K_STRUCT = 5
    K_LIST = 6
    MAX_DEPTH = 128  # as the splitter allows
    MAX_OFFSET = 0x7FFFFFFF  # Arrow's string and list offsets are int32
    SHORT_NAME = 24  # bytes of a name kept in its node (a multiple of 8: see _named)


cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef struct Node:
    int kind
    char* name  # UTF-8, decoded: `text` for a short one
    Py_ssize_t name_len
    char text[SHORT_NAME]  # beside the length, so a lookup reads one cache line
    Py_ssize_t length  # slots
    Py_ssize_t nulls
    Buf valid  # a byte per slot
    Buf values
    Buf offsets  # int32s, a leading 0 then one per slot
    Node** children  # a struct's fields in order of first sight; a list's element node
    Py_ssize_t n_children
    Py_ssize_t cap_children
    Py_ssize_t cursor  # the child a struct's next member most likely names
    bint counted  # a list's element path, counted at its first element


cdef struct Reader:
    cstr s
    Py_ssize_t n
    Py_ssize_t fields  # field paths, as split.shape counts them
    Py_ssize_t values
    Py_ssize_t cells  # slots in all nodes
    Py_ssize_t max_fields
    Py_ssize_t cells_per_value
    Py_ssize_t free_cells
    Buf scratch  # a member name with escapes, decoded


# --- buffers --------------------------------------------------------------------------

cdef int _reserve(Buf* b, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t cap
    cdef char* data
    if b.len + extra <= b.cap:
        return 0
    cap = b.cap if b.cap else 64
    while cap < b.len + extra:
        cap *= 2
    data = <char*>realloc(b.data, cap)
    if data == NULL:
        return -1
    b.data = data
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const void* src, Py_ssize_t size) noexcept nogil:
    if _reserve(b, size) < 0:
        return -1
    memcpy(b.data + b.len, src, size)
    b.len += size
    return 0


cdef inline int _byte(Buf* b, char c) noexcept nogil:
    if b.len == b.cap and _reserve(b, 1) < 0:
        return -1
    b.data[b.len] = c
    b.len += 1
    return 0


cdef inline int _zeros(Buf* b, Py_ssize_t size) noexcept nogil:
    if _reserve(b, size) < 0:
        return -1
    memset(b.data + b.len, 0, size)
    b.len += size
    return 0


cdef inline int _offset(Buf* b, Py_ssize_t value) noexcept nogil:
    cdef int32_t v
    if value > MAX_OFFSET:
        return -1
    v = <int32_t>value
    return _put(b, &v, 4)


# --- nodes ----------------------------------------------------------------------------

cdef void _free(Node* node) noexcept nogil:
    cdef Py_ssize_t k
    if node == NULL:
        return
    for k in range(node.n_children):
        _free(node.children[k])
    free(node.children)
    if node.name != node.text:
        free(node.name)
    free(node.valid.data)
    free(node.values.data)
    free(node.offsets.data)
    free(node)


cdef Node* _child(Node* parent, const char* name, Py_ssize_t name_len) noexcept nogil:
    """A new node appended to `parent`'s children; NULL when memory runs out."""
    cdef Node* node
    cdef Node** grown
    cdef Py_ssize_t cap
    if parent.n_children == parent.cap_children:
        cap = parent.cap_children * 2 if parent.cap_children else 8
        grown = <Node**>realloc(parent.children, cap * sizeof(Node*))
        if grown == NULL:
            return NULL
        parent.children = grown
        parent.cap_children = cap
    node = <Node*>calloc(1, sizeof(Node))
    if node == NULL:
        return NULL
    if name_len <= SHORT_NAME:
        node.name = node.text
    else:
        node.name = <char*>calloc(name_len + 8, 1)  # padded: _named reads 8 bytes at a time
        if node.name == NULL:
            free(node)
            return NULL
    if name_len:
        memcpy(node.name, name, name_len)
    node.name_len = name_len
    parent.children[parent.n_children] = node
    parent.n_children += 1
    return node


cdef int _null(Reader* r, Node* node) noexcept nogil:
    """Append a null slot: a struct's children get one too."""
    cdef Py_ssize_t k
    r.cells += 1
    if _byte(&node.valid, 0) < 0:
        return -1
    node.length += 1
    node.nulls += 1
    if node.kind == K_BOOL:
        return _byte(&node.values, 0)
    if node.kind == K_INT or node.kind == K_DOUBLE:
        return _zeros(&node.values, 8)
    if node.kind == K_STRING:
        return _offset(&node.offsets, node.values.len)
    if node.kind == K_LIST:
        return _offset(&node.offsets, node.children[0].length)
    if node.kind == K_STRUCT:
        for k in range(node.n_children):
            if _null(r, node.children[k]) < 0:
                return -1
    return 0


cdef inline int _become(Node* node, int kind) noexcept nogil:
    if node.kind == kind:
        return 0
    return _change(node, kind)


cdef int _change(Node* node, int kind) noexcept nogil:
    """Give a node that held only nulls its kind: its slots so far get zeroed values.
    -1 where it has another kind (pyarrow refuses the batch: it changed type), except
    that integers become doubles as pyarrow's reader makes them."""
    cdef Py_ssize_t k
    cdef int64_t* ints
    cdef double* doubles
    if node.kind == K_INT and kind == K_DOUBLE:
        ints = <int64_t*>node.values.data
        doubles = <double*>node.values.data
        for k in range(node.length):
            doubles[k] = <double>ints[k]
        node.kind = K_DOUBLE
        return 0
    if node.kind != K_NULL:
        return -1
    node.kind = kind
    if kind == K_BOOL:
        return _zeros(&node.values, node.length)
    if kind == K_INT or kind == K_DOUBLE:
        return _zeros(&node.values, 8 * node.length)
    if kind == K_STRING or kind == K_LIST:
        if _zeros(&node.offsets, 4 * (node.length + 1)) < 0:
            return -1
        if kind == K_LIST and _child(node, NULL, 0) == NULL:
            return -1
    return 0


cdef inline int _valid(Reader* r, Node* node) noexcept nogil:
    r.cells += 1
    r.values += 1
    node.length += 1
    return _byte(&node.valid, 1)


# --- the walk -------------------------------------------------------------------------

cdef Py_ssize_t _decode(cstr s, Py_ssize_t i, Py_ssize_t n, Buf* out) noexcept nogil:
    """Append the string at s[i] (its quote), decoded, to `out`; its end past the closing
    quote, or -1: not JSON, not UTF-8, or an escaped surrogate not in a pair."""
    cdef unsigned char c
    cdef Py_ssize_t run
    cdef int k, h, v
    cdef char utf8[4]
    i += 1
    while True:
        run = i
        while run + 4 <= n and _PLAIN[s[run]] & _PLAIN[s[run + 1]] & _PLAIN[s[run + 2]] & _PLAIN[
                s[run + 3]]:
            run += 4
        while run < n and _PLAIN[s[run]]:
            run += 1
        if run > i and _put(out, s + i, run - i) < 0:
            return -1
        i = run
        if i >= n:
            return -1
        c = s[i]
        if c == 0x22:
            return i + 1
        if c == 0x5C:
            if i + 1 >= n:
                return -1
            c = s[i + 1]
            if c == 0x75:  # \uXXXX
                v = _hex4(s, i + 2, n)
                if v < 0 or 0xDC00 <= v <= 0xDFFF:
                    return -1  # not hex, or a low surrogate alone
                if 0xD800 <= v <= 0xDBFF:  # a pair, as one code point
                    h = _hex4(s, i + 8, n) if i + 7 < n and s[i + 6] == 0x5C and s[
                        i + 7] == 0x75 else -1
                    if not 0xDC00 <= h <= 0xDFFF:
                        return -1
                    v = 0x10000 + ((v - 0xD800) << 10) + (h - 0xDC00)
                    utf8[0] = <char>(0xF0 | (v >> 18))
                    utf8[1] = <char>(0x80 | ((v >> 12) & 0x3F))
                    utf8[2] = <char>(0x80 | ((v >> 6) & 0x3F))
                    utf8[3] = <char>(0x80 | (v & 0x3F))
                    if _put(out, utf8, 4) < 0:
                        return -1
                    i += 12
                    continue
                if v < 0x80:
                    utf8[0] = <char>v
                    k = 1
                elif v < 0x800:
                    utf8[0] = <char>(0xC0 | (v >> 6))
                    utf8[1] = <char>(0x80 | (v & 0x3F))
                    k = 2
                else:
                    utf8[0] = <char>(0xE0 | (v >> 12))
                    utf8[1] = <char>(0x80 | ((v >> 6) & 0x3F))
                    utf8[2] = <char>(0x80 | (v & 0x3F))
                    k = 3
                if _put(out, utf8, k) < 0:
                    return -1
                i += 6
                continue
            if c == 0x62:
                c = 0x08
            elif c == 0x66:
                c = 0x0C
            elif c == 0x6E:
                c = 0x0A
            elif c == 0x72:
                c = 0x0D
            elif c == 0x74:
                c = 0x09
            elif not (c == 0x22 or c == 0x5C or c == 0x2F):
                return -1
            if _byte(out, <char>c) < 0:
                return -1
            i += 2
            continue
        if c < 0x80:  # a control character
            return -1
        k = _utf8(s, i, n)  # UTF-8, well-formed
        if k == 0 or _put(out, s + i, k) < 0:
            return -1
        i += k


cdef inline bint _dated(const char* text, Py_ssize_t size) noexcept nogil:
    """Whether a string starts as a date does (YYYY-): pyarrow's reader may make its
    column a timestamp."""
    cdef Py_ssize_t k
    if size < 5 or text[4] != 0x2D:
        return False
    for k in range(4):
        if not 0x30 <= text[k] <= 0x39:
            return False
    return True


cdef Py_ssize_t _number(Reader* r, Py_ssize_t i, Node* node) noexcept nogil:
    """Append the number at s[i]: an int64, or a double once the text has a fraction or an
    exponent (or the column has doubles); -1 past int64 or a double's range."""
    cdef cstr s = r.s
    cdef Py_ssize_t j = i, digits
    cdef bint negative = False, fraction = False
    cdef uint64_t magnitude = 0
    cdef int64_t whole
    cdef double real
    cdef char* end
    if s[j] == 0x2D:
        negative = True
        j += 1
    digits = j
    while j < r.n and 0x30 <= s[j] <= 0x39:
        if j - digits >= 19:  # past 19 digits, an integer is past int64
            break
        magnitude = magnitude * 10 + (s[j] - 0x30)
        j += 1
    if j == digits:
        return -1
    if j < r.n and (s[j] == 0x2E or s[j] == 0x65 or s[j] == 0x45):
        fraction = True
    elif j < r.n and 0x30 <= s[j] <= 0x39:
        return -1  # 20 digits or more
    if not fraction:
        if magnitude > (<uint64_t>1 << 63) - (0 if negative else 1):
            return -1
        whole = -<int64_t>(magnitude - 1) - 1 if negative and magnitude else (
            <int64_t>magnitude)
        if node.kind == K_DOUBLE:
            real = <double>whole
            if _put(&node.values, &real, 8) < 0:
                return -1
        else:
            if _become(node, K_INT) < 0 or _put(&node.values, &whole, 8) < 0:
                return -1
        return j if _valid(r, node) == 0 else -1
    # The batch is a bytes object, so a NUL ends it: strtod stops at the number's end.
    real = strtod(<const char*>(s + i), &end)
    if isinf(real) or <cstr>end == s + i:
        return -1
    if _become(node, K_DOUBLE) < 0 or _put(&node.values, &real, 8) < 0:
        return -1
    return (<cstr>end - s) if _valid(r, node) == 0 else -1


cdef inline bint _same(const char* a, const char* b, Py_ssize_t size) noexcept nogil:
    """memcmp(a, b, size) == 0, inline: names are a few bytes, shorter than a call."""
    cdef Py_ssize_t k
    for k in range(size):
        if a[k] != b[k]:
            return False
    return True


# _MASKS[k]: k bytes of 0xFF, then zeros: the first k bytes of a word, either byte order.
cdef unsigned char _MASKS[9][8]


cdef void _fill_masks() noexcept:
    cdef int k, b
    for k in range(9):
        for b in range(8):
            _MASKS[k][b] = 0xFF if b < k else 0


_fill_masks()


cdef inline bint _named(Node* node, const char* name, Py_ssize_t size,
                        bint padded) noexcept nogil:
    """Whether `node` is named `name`: 8 bytes at a time where `name`, like a node's own
    name, may be read up to 8 bytes past its end."""
    cdef uint64_t x, y, mask
    cdef const char* own = node.name
    if node.name_len != size:
        return False
    if not padded:
        return _same(own, name, size)
    while size > 8:
        memcpy(&x, own, 8)
        memcpy(&y, name, 8)
        if x != y:
            return False
        own += 8
        name += 8
        size -= 8
    if size == 0:
        return True
    memcpy(&x, own, 8)
    memcpy(&y, name, 8)
    memcpy(&mask, _MASKS[size], 8)
    return (x ^ y) & mask == 0


cdef inline bint _word(cstr s, Py_ssize_t i, Py_ssize_t n, const char* word,
                       Py_ssize_t size) noexcept nogil:
    return i + size <= n and _same(<const char*>(s + i), word, size)


cdef Py_ssize_t _member(Reader* r, Py_ssize_t i, Node* node, Py_ssize_t row,
                        int depth) noexcept nogil:
    """Read the member at s[i] (its name's quote) into `node`'s struct slot `row`."""
    cdef cstr s = r.s
    cdef Py_ssize_t end, size, k
    cdef const char* name
    cdef Node* child = NULL
    cdef bint padded
    end = i + 1
    while end < r.n and _PLAIN[s[end]]:
        end += 1
    if end < r.n and s[end] == 0x22:  # printable ASCII: compared as it stands
        name = <const char*>(s + i + 1)
        size = end - i - 1
        # Read in words up to s[i + size rounded up to 8]: at most the byte past the
        # line's newline (the next line, or the NUL that ends every bytes object).
        padded = i + ((size + 7) & ~7) <= r.n + 1
        end += 1
    else:  # escapes, or UTF-8 to check
        r.scratch.len = 0
        end = _decode(s, i, r.n, &r.scratch)
        if end < 0 or _reserve(&r.scratch, 8) < 0:
            return -1
        name = r.scratch.data
        size = r.scratch.len
        padded = True
    k = node.cursor  # members mostly come in the order of the last object's
    if k < node.n_children and _named(node.children[k], name, size, padded):
        child = node.children[k]
    else:
        for k in range(node.n_children):
            if _named(node.children[k], name, size, padded):
                child = node.children[k]
                break
    if child == NULL:  # a new field: null in every slot before this one
        r.fields += 1
        if r.fields > r.max_fields:
            return -1
        child = _child(node, name, size)
        if child == NULL:
            return -1
        k = node.n_children - 1
        for _ in range(row):
            if _null(r, child) < 0:
                return -1
        if r.cells > r.cells_per_value * r.values + r.free_cells:
            return -1
    elif child.length > row:  # named twice in one object: pyarrow refuses it
        return -1
    node.cursor = k + 1
    i = _ws(s, end, r.n)
    if i >= r.n or s[i] != 0x3A:
        return -1
    return _value(r, _ws(s, i + 1, r.n), child, depth + 1)


cdef Py_ssize_t _value(Reader* r, Py_ssize_t i, Node* node, int depth) noexcept nogil:
    """Append the value at s[i] to `node`; the end of it, or -1: the batch is not read."""
    cdef cstr s = r.s
    cdef Py_ssize_t n = r.n, row, start, opened, k
    cdef unsigned char c
    cdef Node* element
    if i >= n or depth > MAX_DEPTH:
        return -1
    c = s[i]
    if c == 0x22:
        if _become(node, K_STRING) < 0:
            return -1
        start = node.values.len
        if _dated(<const char*>(s + i + 1), n - i - 1):
            return -1
        opened = i
        i = _decode(s, i, n, &node.values)
        if i < 0:
            return -1
        # Decoded as it was sent, it was checked above; only an escape may spell a date.
        if i - opened - 2 != node.values.len - start and _dated(
                node.values.data + start, node.values.len - start):
            return -1
        if _offset(&node.offsets, node.values.len) < 0 or _valid(r, node) < 0:
            return -1
        return i
    if c == 0x7B:
        if _become(node, K_STRUCT) < 0:
            return -1
        row = node.length
        node.cursor = 0
        i = _ws(s, i + 1, n)
        if i < n and s[i] == 0x7D:
            i += 1
        else:
            while True:
                if i >= n or s[i] != 0x22:
                    return -1
                i = _member(r, i, node, row, depth)
                if i < 0:
                    return -1
                i = _ws(s, i, n)
                if i < n and s[i] == 0x2C:
                    i = _ws(s, i + 1, n)
                elif i < n and s[i] == 0x7D:
                    i += 1
                    break
                else:
                    return -1
        for k in range(node.n_children):  # the fields it lacks are null
            if node.children[k].length == row and _null(r, node.children[k]) < 0:
                return -1
        if r.cells > r.cells_per_value * r.values + r.free_cells:
            return -1
        return i if _valid(r, node) == 0 else -1
    if c == 0x5B:
        if _become(node, K_LIST) < 0:
            return -1
        element = node.children[0]
        i = _ws(s, i + 1, n)
        if i < n and s[i] == 0x5D:
            i += 1
        else:
            if not node.counted:
                node.counted = True
                r.fields += 1
                if r.fields > r.max_fields:
                    return -1
            while True:
                i = _value(r, i, element, depth + 1)
                if i < 0:
                    return -1
                i = _ws(s, i, n)
                if i < n and s[i] == 0x2C:
                    i = _ws(s, i + 1, n)
                elif i < n and s[i] == 0x5D:
                    i += 1
                    break
                else:
                    return -1
        if _offset(&node.offsets, element.length) < 0:
            return -1
        return i if _valid(r, node) == 0 else -1
    if c == 0x74 or c == 0x66:
        if not (_word(s, i, n, "true", 4) or _word(s, i, n, "false", 5)):
            return -1
        if _become(node, K_BOOL) < 0 or _byte(&node.values, c == 0x74) < 0:
            return -1
        return i + (4 if c == 0x74 else 5) if _valid(r, node) == 0 else -1
    if c == 0x6E:
        if not _word(s, i, n, "null", 4):
            return -1
        r.values += 1
        return i + 4 if _null(r, node) == 0 else -1
    if c == 0x2D or 0x30 <= c <= 0x39:
        return _number(r, i, node)
    return -1


cdef int _walk(Reader* r, Node* root, Py_ssize_t size) noexcept nogil:
    """Read every line of the batch as a row of `root`; -1 where the batch is not read."""
    cdef Py_ssize_t start = 0, stop, end
    cdef const void* newline
    while start < size:
        newline = memchr(r.s + start, 0x0A, size - start)
        if newline == NULL:
            return -1
        stop = <cstr>newline - r.s
        end = _ws(r.s, start, stop)
        if end >= stop or r.s[end] != 0x7B:
            return -1  # a row is an object
        r.n = stop  # a line's value ends at its newline
        end = _value(r, end, root, 0)
        if end < 0 or _ws(r.s, end, stop) != stop:
            return -1
        start = stop + 1
    return 0


# --- out to Python ----------------------------------------------------------------------

cdef object _bitmap(Buf* bytes_, Py_ssize_t length):
    """A byte per slot packed into Arrow's bitmap (least significant bit first)."""
    cdef object out = PyBytes_FromStringAndSize(NULL, (length + 7) // 8)
    cdef unsigned char* bits = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t k
    memset(bits, 0, (length + 7) // 8)
    for k in range(length):
        if bytes_.data[k]:
            bits[k >> 3] |= 1 << (k & 7)
    return memoryview(out)


cdef class _Memory:
    """A node's buffer handed over as it is, freed when the last view of it goes."""
    cdef char* data
    cdef Py_ssize_t size

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        free(self.data)


cdef object _take(Buf* b):
    """A view of `b`'s bytes, which it now owns: no copy of a batch's megabytes."""
    cdef _Memory memory
    if not b.len:
        return memoryview(b"")
    memory = _Memory.__new__(_Memory)
    memory.data = b.data
    memory.size = b.len
    b.data = NULL
    b.len = b.cap = 0
    return memoryview(memory)


cdef tuple _out(Node* node):
    """(name, kind, length, nulls, validity bitmap or None, values, offsets, children)."""
    cdef Py_ssize_t k
    name = PyUnicode_DecodeUTF8(node.name, node.name_len, NULL) if node.name_len else ""
    if node.kind == K_BOOL:
        values = _bitmap(&node.values, node.length)
    else:
        values = _take(&node.values)
    children = tuple([_out(node.children[k]) for k in range(node.n_children)])
    return (
        name,
        node.kind,
        node.length,
        node.nulls,
        _bitmap(&node.valid, node.length) if node.nulls else None,
        values,
        _take(&node.offsets),
        children,
    )


def read(bytes batch not None, Py_ssize_t max_fields, Py_ssize_t cells_per_value,
         Py_ssize_t free_cells):
    """((rows, fields, values), columns) of an NDJSON batch, or None (see the twin)."""
    cdef Reader r
    cdef Node* root = <Node*>calloc(1, sizeof(Node))
    cdef Py_ssize_t size = PyBytes_GET_SIZE(batch)
    cdef int done
    if root == NULL:
        raise MemoryError()
    memset(&r, 0, sizeof(Reader))
    r.s = <cstr>PyBytes_AS_STRING(batch)
    r.max_fields = max_fields
    r.cells_per_value = cells_per_value
    r.free_cells = free_cells
    try:
        with nogil:
            done = _walk(&r, root, size)
        if done < 0 or not root.length:
            return None
        return (root.length, r.fields, r.values), _out(root)[7]
    finally:
        free(r.scratch.data)
        _free(root)

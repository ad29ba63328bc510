# cython: language_level=3
"""Split a JSON body into payloads without building it: the compiled twin of ``_split_py.py``.

``_split_py.py`` is the specification, function for function; read its docstring for
what is returned and when None sends the body to the orjson path. Here the scan is
C over the body's bytes: no Python object is made until the chunk is copied out, so
a 10-payload collection costs one pass instead of orjson building every dict and
string and dumping them again. ``field_values`` and ``field_groups`` scan a chunk the
same way for the fields a partitioned batch needs.

The scanning functions take no Python object and hold no reference (``nogil``).
They are not run with the GIL released: a body is at most a few MiB and is scanned
in microseconds, less than a release and re-acquire would cost the event loop.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.string cimport memchr, memcmp, memcpy

from fastingest._scan cimport _PLAIN, _hex4, _utf8, _ws, cstr

cdef enum:
    MAX_DEPTH = 128  # containers inside containers (orjson allows 1024)
    MAX_NUMBER = 100  # characters in a number; a longer one may be infinite as a double
    MAX_MEMBERS = 64  # in an object whose names are checked: their spans live on the stack
    MAX_FIELDS = 16  # names field_values looks for



cdef struct Span:
    Py_ssize_t start
    Py_ssize_t end


cdef Py_ssize_t _string(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The end of the string at s[i] (past its closing quote); -1 for None."""
    cdef unsigned char c
    cdef int k, v
    i += 1
    while i < n:
        while i + 4 <= n and _PLAIN[s[i]] & _PLAIN[s[i + 1]] & _PLAIN[s[i + 2]] & _PLAIN[s[i + 3]]:
            i += 4
        while i < n and _PLAIN[s[i]]:
            i += 1
        if i >= n:
            return -1
        c = s[i]
        if c == 0x22:  # "
            return i + 1
        if c == 0x5C:  # backslash
            if i + 1 >= n:
                return -1
            c = s[i + 1]
            if c == 0x75:  # u
                v = _hex4(s, i + 2, n)
                if v < 0 or 0xD800 <= v <= 0xDFFF:
                    return -1  # not hex, or a surrogate: orjson may refuse it
                i += 6
            elif (c == 0x22 or c == 0x5C or c == 0x2F or c == 0x62 or c == 0x66
                  or c == 0x6E or c == 0x72 or c == 0x74):
                i += 2
            else:
                return -1
        elif c < 0x80:  # a control character (the rest of ASCII is plain)
            return -1
        else:  # UTF-8, well-formed
            k = _utf8(s, i, n)
            if k == 0:
                return -1
            i += k
    return -1


cdef Py_ssize_t _number(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t start = i
    cdef unsigned char c
    if i < n and s[i] == 0x2D:  # -
        i += 1
    if i >= n:
        return -1
    if s[i] == 0x30:
        i += 1
    elif 0x31 <= s[i] <= 0x39:
        while i < n and 0x30 <= s[i] <= 0x39:
            i += 1
    else:
        return -1
    if i < n and s[i] == 0x2E:  # .
        if i + 1 >= n or not 0x30 <= s[i + 1] <= 0x39:
            return -1
        i += 1
        while i < n and 0x30 <= s[i] <= 0x39:
            i += 1
    if i < n:
        c = s[i]
        if 0x30 <= c <= 0x39 or c == 0x65 or c == 0x45 or c == 0x2E:  # an exponent, or invalid
            return -1
    if i - start > MAX_NUMBER:
        return -1
    return i


cdef inline Py_ssize_t _literal(cstr s, Py_ssize_t i, Py_ssize_t n, const char* word,
                                Py_ssize_t size) noexcept nogil:
    if n - i >= size and memcmp(s + i, word, size) == 0:
        return i + size
    return -1


cdef inline Py_ssize_t _word(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The end of the true, false or null at s[i] (i < n); -1 if it is misspelt; 0 if
    s[i] starts none of them."""
    cdef unsigned char c = s[i]
    if c == 0x74:
        return _literal(s, i, n, "true", 4)
    if c == 0x66:
        return _literal(s, i, n, "false", 5)
    if c == 0x6E:
        return _literal(s, i, n, "null", 4)
    return 0


cdef struct Names:
    Span spans[MAX_MEMBERS]
    int count
    unsigned long long seen  # one bit per (length, first and last byte) class seen so far


cdef inline bint _repeats(cstr s, Names* names, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """Whether s[start:end] is a name this object already has; then it is added.

    The caller checks there is room. Most names fall in a class no earlier name did,
    so they are not compared with any (a 64-bit set of classes, as in a Bloom filter).
    """
    cdef int k
    cdef Py_ssize_t size = end - start
    cdef unsigned long long bit = 1ULL << ((size * 7 + (s[start] + s[end - 1] if size else 0)) & 63)
    cdef bint found = False
    if names.seen & bit:
        for k in range(names.count):
            if (names.spans[k].end - names.spans[k].start == size
                    and memcmp(s + names.spans[k].start, s + start, size) == 0):
                found = True
                break
    names.seen |= bit
    names.spans[names.count].start = start
    names.spans[names.count].end = end
    names.count += 1
    return found


cdef Py_ssize_t _value(cstr s, Py_ssize_t i, Py_ssize_t n, int depth, bint unique) noexcept nogil:
    """The end of the value at s[i], which `depth` containers hold; -1 for None."""
    if i >= n:
        return -1
    cdef unsigned char c = s[i]
    if c == 0x22:
        return _string(s, i, n)
    if c == 0x7B or c == 0x5B:
        if depth >= MAX_DEPTH:
            return -1
        if c == 0x7B:
            return _object(s, i, n, depth + 1, unique)
        return _array(s, i, n, depth + 1, unique)
    cdef Py_ssize_t end = _word(s, i, n)
    return end if end else _number(s, i, n)


cdef Py_ssize_t _object(cstr s, Py_ssize_t i, Py_ssize_t n, int depth,
                        bint unique) noexcept nogil:
    cdef Names names
    cdef Py_ssize_t end
    names.count = 0
    names.seen = 0
    i = _ws(s, i + 1, n)
    if i < n and s[i] == 0x7D:
        return i + 1
    while True:
        if i >= n or s[i] != 0x22:
            return -1
        end = _string(s, i, n)
        if end < 0:
            return -1
        if unique and (names.count == MAX_MEMBERS or memchr(s + i + 1, 0x5C, end - i - 2) != NULL
                       or _repeats(s, &names, i + 1, end - 1)):
            return -1
        i = _ws(s, end, n)
        if i >= n or s[i] != 0x3A:  # :
            return -1
        i = _value(s, _ws(s, i + 1, n), n, depth, unique)
        if i < 0:
            return -1
        i = _ws(s, i, n)
        if i < n and s[i] == 0x2C:  # ,
            i = _ws(s, i + 1, n)
        elif i < n and s[i] == 0x7D:
            return i + 1
        else:
            return -1


cdef Py_ssize_t _array(cstr s, Py_ssize_t i, Py_ssize_t n, int depth,
                       bint unique) noexcept nogil:
    i = _ws(s, i + 1, n)
    if i < n and s[i] == 0x5D:
        return i + 1
    while True:
        i = _value(s, i, n, depth, unique)
        if i < 0:
            return -1
        i = _ws(s, i, n)
        if i < n and s[i] == 0x2C:
            i = _ws(s, i + 1, n)
        elif i < n and s[i] == 0x5D:
            return i + 1
        else:
            return -1


cdef Py_ssize_t _payloads(cstr s, Py_ssize_t i, Py_ssize_t n, int depth, char* out,
                          Py_ssize_t* size, Py_ssize_t* count, bint unique) noexcept nogil:
    """A non-empty array of objects at s[i], `depth` containers deep: copied to out."""
    cdef Py_ssize_t end
    i = _ws(s, i + 1, n)
    while True:
        if i >= n or s[i] != 0x7B:
            return -1
        end = _value(s, i, n, depth, unique)
        if end < 0 or not _one_line(s, i, end):
            return -1
        memcpy(out + size[0], s + i, end - i)
        size[0] += end - i + 1
        out[size[0] - 1] = 0x0A
        count[0] += 1
        i = _ws(s, end, n)
        if i < n and s[i] == 0x2C:
            i = _ws(s, i + 1, n)
        elif i < n and s[i] == 0x5D:
            return i + 1
        else:
            return -1


cdef Py_ssize_t _collection(cstr s, Py_ssize_t i, Py_ssize_t n, char* out, Py_ssize_t* size,
                            Py_ssize_t* count, Span* token, bint unique) noexcept nogil:
    """A top-level object at s[i]; its "data" copied to out. -1 for None.

    A repeated name is None for a collection; for a lone object (the payload) only with
    `unique`.
    """
    cdef Py_ssize_t end, key_size
    cdef cstr key
    cdef Names names
    cdef bint repeated = False
    names.count = 0
    names.seen = 0
    i = _ws(s, i + 1, n)
    if i < n and s[i] == 0x7D:
        return i + 1
    while True:
        if i >= n or s[i] != 0x22:
            return -1
        end = _string(s, i, n)
        if end < 0 or memchr(s + i + 1, 0x5C, end - i - 2) != NULL or names.count == MAX_MEMBERS:
            return -1  # invalid, a key written with an escape, or too many to check
        repeated = _repeats(s, &names, i + 1, end - 1) or repeated
        key = s + i + 1
        key_size = end - i - 2
        i = _ws(s, end, n)
        if i >= n or s[i] != 0x3A:
            return -1
        i = _ws(s, i + 1, n)
        if key_size == 4 and memcmp(key, b"data", 4) == 0:
            if count[0] or i >= n or s[i] != 0x5B:
                return -1
            i = _payloads(s, i, n, 2, out, size, count, unique)
        elif key_size == 5 and memcmp(key, b"token", 5) == 0:
            if i < n and s[i] == 0x22:
                end = _string(s, i, n)
                if end < 0 or memchr(s + i, 0x5C, end - i) != NULL:
                    return -1
                token.start = i + 1
                token.end = end - 1
                i = end
            else:
                i = _value(s, i, n, 1, unique)
        else:
            i = _value(s, i, n, 1, unique)
        if i < 0:
            return -1
        i = _ws(s, i, n)
        if i < n and s[i] == 0x2C:
            i = _ws(s, i + 1, n)
        elif i < n and s[i] == 0x7D:
            if repeated and (count[0] or unique):
                return -1
            if not count[0]:
                token.start = token.end = -1  # a lone object has no token
            return i + 1
        else:
            return -1


cdef inline bint _one_line(cstr s, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    return (memchr(s + start, 0x0A, end - start) == NULL
            and memchr(s + start, 0x0D, end - start) == NULL)


def members_unique(bytes body not None):
    """Whether `body`, JSON values one after another (NDJSON), is sure to repeat no member
    name in any object; False also where the splitter would leave the body alone."""
    cdef cstr s = <cstr>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t i = _ws(s, 0, n)
    while i < n:
        i = _value(s, i, n, 0, True)
        if i < 0:
            return False
        i = _ws(s, i, n)
    return True


def split_payloads(bytes body not None, bint unique=True):
    """The body's payloads as an NDJSON chunk, their count and the collection's token."""
    cdef cstr s = <cstr>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t i = _ws(s, 0, n)
    cdef Py_ssize_t end = -1
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t count = 0
    cdef Span token
    token.start = token.end = -1
    if i == n:
        return None
    # Each payload plus its newline fits in the body: payloads are disjoint and each is
    # followed by at least a "," or a "]". A lone object may need one byte more.
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 1)
    cdef char* buf = PyBytes_AS_STRING(out)
    if s[i] == 0x5B:
        end = _payloads(s, i, n, 1, buf, &size, &count, unique)
    elif s[i] == 0x7B:
        end = _collection(s, i, n, buf, &size, &count, &token, unique)
        if end >= 0 and not count:  # no "data": the object is the payload
            if not _one_line(s, i, end):
                return None
            memcpy(buf, s + i, end - i)
            buf[end - i] = 0x0A
            size = end - i + 1
            count = 1
    if end < 0 or _ws(s, end, n) != n:
        return None
    text = None
    if token.start >= 0:
        text = s[token.start:token.end].decode("utf-8")
    return out[:size], count, text



cdef struct Wanted:
    int count
    int distinct  # names not given twice
    bint unique  # no line repeats a member name: stop at the last name wanted
    cstr names[MAX_FIELDS]
    Py_ssize_t sizes[MAX_FIELDS]
    Span found[MAX_FIELDS]  # each name's value in the line; start -1 where it lacks it


cdef int _wanted(Wanted* w, tuple names, bint unique) except -1:
    cdef int k
    cdef bytes name
    if len(names) > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} names")
    w.count = len(names)
    w.distinct = len(set(names))
    w.unique = unique
    for k in range(w.count):
        name = names[k]
        w.names[k] = <cstr>PyBytes_AS_STRING(name)
        w.sizes[k] = PyBytes_GET_SIZE(name)
    return 0


cdef bint _members(cstr s, Py_ssize_t start, Py_ssize_t stop, Wanted* w) noexcept nogil:
    """Find w's names among the top-level members of the object s[start:stop]; False
    where the line is not one object read whole or writes a name with an escape."""
    cdef Py_ssize_t i, end, value, name_at, name_size
    cdef int k, left = w.distinct
    cdef bint matched
    for k in range(w.count):
        w.found[k].start = -1
    i = _ws(s, start, stop)
    if i >= stop or s[i] != 0x7B:
        return False
    i = _ws(s, i + 1, stop)
    if i < stop and s[i] == 0x7D:
        return _ws(s, i + 1, stop) == stop
    while True:
        if i >= stop or s[i] != 0x22:
            return False
        end = _string(s, i, stop)
        if end < 0 or memchr(s + i + 1, 0x5C, end - i - 2) != NULL:
            return False  # a name written with an escape: only orjson would match it
        name_at = i + 1
        name_size = end - i - 2
        i = _ws(s, end, stop)
        if i >= stop or s[i] != 0x3A:
            return False
        value = _ws(s, i + 1, stop)
        i = _value(s, value, stop, 1, False)
        if i < 0:
            return False
        matched = False
        for k in range(w.count):
            if w.sizes[k] == name_size and memcmp(w.names[k], s + name_at, name_size) == 0:
                w.found[k].start = value
                w.found[k].end = i
                matched = True
        if matched:
            left -= 1
            if w.unique and left == 0:
                return True
        i = _ws(s, i, stop)
        if i < stop and s[i] == 0x2C:
            i = _ws(s, i + 1, stop)
        elif i < stop and s[i] == 0x7D:
            return _ws(s, i + 1, stop) == stop
        else:
            return False


cdef inline object _found(cstr s, Wanted* w, int k):
    if w.found[k].start < 0:
        return None
    return PyBytes_FromStringAndSize(<const char*>s + w.found[k].start,
                                     w.found[k].end - w.found[k].start)


def field_values(bytes chunk not None, tuple names not None, bint unique=False):
    """The JSON text of the top-level members `names` of each line's object, line after
    line; None for the chunk where a line is not one object read whole (see the twin)."""
    return _scan(chunk, names, unique, False)


def field_groups(bytes chunk not None, tuple names not None, bint unique=False):
    """The lines of `chunk` grouped by the JSON text of their top-level members `names`
    (see the twin); None where field_values is."""
    return _scan(chunk, names, unique, True)


cdef object _scan(bytes chunk, tuple names, bint unique, bint grouped):
    cdef cstr s = <cstr>PyBytes_AS_STRING(chunk)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
    cdef Py_ssize_t start = 0, stop
    cdef const void* newline
    cdef Wanted w
    cdef int k
    cdef list values = []
    cdef dict groups = {}
    cdef tuple key
    cdef object value, lines
    cdef bytes line
    _wanted(&w, names, unique)
    while start < n:
        newline = memchr(s + start, 0x0A, n - start)
        if newline == NULL:
            return None
        stop = <cstr>newline - s
        if not _members(s, start, stop, &w):
            return None
        if not grouped:
            for k in range(w.count):
                values.append(_found(s, &w, k))
            start = stop + 1
            continue
        key = PyTuple_New(w.count)
        for k in range(w.count):
            value = _found(s, &w, k)
            Py_INCREF(value)  # PyTuple_SET_ITEM steals it
            PyTuple_SET_ITEM(key, k, value)
        line = PyBytes_FromStringAndSize(<const char*>s + start, stop + 1 - start)
        lines = groups.get(key)
        if lines is None:
            groups[key] = [line]
        else:
            (<list>lines).append(line)
        start = stop + 1
    return groups if grouped else values


# --- shape: a batch measured as a table ------------------------------------------------

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free

cdef enum:
    FNV_OFFSET = 0xCBF29CE484222325
    FNV_PRIME = 0x100000001B3
    ELEMENTS = 0x01  # an array's elements, in a path: no member name holds a control byte


cdef struct Paths:
    uint64_t* slots  # hashes of the paths seen (never 0); open addressing
    Py_ssize_t mask
    Py_ssize_t count
    Py_ssize_t limit


cdef inline uint64_t _mix(uint64_t h, cstr s, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(start, end):
        h = (h ^ s[i]) * <uint64_t>FNV_PRIME
    return h


cdef inline uint64_t _mix_byte(uint64_t h, unsigned char c) noexcept nogil:
    return (h ^ c) * <uint64_t>FNV_PRIME


cdef inline bint _seen(Paths* paths, uint64_t h) noexcept nogil:
    """Add path `h`; False once more than the limit are there."""
    cdef Py_ssize_t j
    h |= 1
    j = <Py_ssize_t>(h & <uint64_t>paths.mask)
    while paths.slots[j]:
        if paths.slots[j] == h:
            return True
        j = (j + 1) & paths.mask
    paths.slots[j] = h
    paths.count += 1
    return paths.count <= paths.limit


cdef Py_ssize_t _any_string(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The end of the string at s[i], any escape allowed: the next quote that an even
    run of backslashes (or none) precedes; -1 where there is none."""
    cdef const void* found
    cdef Py_ssize_t quote, k
    i += 1
    while i < n:
        found = memchr(s + i, 0x22, n - i)
        if found == NULL:
            return -1
        quote = <cstr>found - s
        k = quote
        while k > i and s[k - 1] == 0x5C:
            k -= 1
        if (quote - k) % 2 == 0:
            return quote + 1
        i = quote + 1
    return -1


cdef Py_ssize_t _shape(cstr s, Py_ssize_t i, Py_ssize_t n, uint64_t path, int depth,
                       Paths* paths, Py_ssize_t* values) noexcept nogil:
    """The end of the value at s[i], its paths in `paths`; -1 where it is not JSON, -2 once
    the paths are past their limit (see the twin)."""
    cdef unsigned char c
    cdef Py_ssize_t end
    cdef uint64_t member
    if i >= n:
        return -1
    c = s[i]
    values[0] += 1
    if c == 0x22:
        return _any_string(s, i, n)
    if c == 0x7B or c == 0x5B:
        if depth >= MAX_DEPTH:
            return -1
        i = _ws(s, i + 1, n)
        if i < n and s[i] == (0x7D if c == 0x7B else 0x5D):
            return i + 1
        if c == 0x5B:
            path = _mix_byte(path, ELEMENTS)
            if not _seen(paths, path):
                return -2
        while True:
            if c == 0x7B:
                if i >= n or s[i] != 0x22:
                    return -1
                end = _any_string(s, i, n)
                if end < 0:
                    return -1
                member = _mix(_mix_byte(path, 0x22), s, i + 1, end - 1)
                if not _seen(paths, member):
                    return -2
                i = _ws(s, end, n)
                if i >= n or s[i] != 0x3A:
                    return -1
                i = _shape(s, _ws(s, i + 1, n), n, member, depth + 1, paths, values)
            else:
                i = _shape(s, i, n, path, depth + 1, paths, values)
            if i < 0:
                return i
            i = _ws(s, i, n)
            if i < n and s[i] == 0x2C:
                i = _ws(s, i + 1, n)
            elif i < n and s[i] == (0x7D if c == 0x7B else 0x5D):
                return i + 1
            else:
                return -1
    end = _word(s, i, n)
    if end:
        return end
    end = i
    while end < n and (0x30 <= s[end] <= 0x39 or s[end] == 0x2D or s[end] == 0x2B
                       or s[end] == 0x2E or s[end] == 0x65 or s[end] == 0x45):
        end += 1
    return end if end > i else -1


def shape(bytes batch not None, Py_ssize_t limit):
    """(lines, distinct field paths, values) of an NDJSON batch; paths stop at limit + 1.
    None where a line is not one JSON value (see the twin)."""
    cdef cstr s = <cstr>PyBytes_AS_STRING(batch)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(batch)
    cdef Py_ssize_t start = 0, stop, end, rows = 0, values = 0, found, size = 16
    cdef const void* newline
    cdef Paths paths
    if limit < 0:
        raise ValueError("limit must be >= 0")
    while size < 2 * (limit + 1):
        size *= 2
    paths.slots = <uint64_t*>calloc(size, sizeof(uint64_t))
    if paths.slots == NULL:
        raise MemoryError()
    paths.mask = size - 1
    paths.count = 0
    paths.limit = limit
    try:
        while start < n:
            newline = memchr(s + start, 0x0A, n - start)
            if newline == NULL:
                return None
            stop = <cstr>newline - s
            found = 0
            end = _shape(s, _ws(s, start, stop), stop, <uint64_t>FNV_OFFSET, 0, &paths, &found)
            if end == -2:
                return rows, limit + 1, values  # past the limit: nothing more to learn
            if end < 0 or _ws(s, end, stop) != stop:
                return None
            rows += 1
            values += found
            start = stop + 1
        return rows, paths.count, values
    finally:
        free(paths.slots)

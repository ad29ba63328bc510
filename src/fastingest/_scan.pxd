# cython: language_level=3
"""Inline pieces of a JSON scan over bytes, cimported by the compiled splitter
(``_split.pyx``) and column reader (``_columns.pyx``): nothing here holds a Python object."""

ctypedef const unsigned char* cstr

cdef extern from "_scan.h":
    const unsigned char _PLAIN "FASTINGEST_PLAIN"[256]  # 1 for a byte a string holds as it is


cdef inline Py_ssize_t _ws(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == 0x20 or s[i] == 0x0A or s[i] == 0x0D or s[i] == 0x09):
        i += 1
    return i


cdef inline int _hex(unsigned char c) noexcept nogil:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    if 0x41 <= c <= 0x46:
        return c - 0x41 + 10
    if 0x61 <= c <= 0x66:
        return c - 0x61 + 10
    return -1


cdef inline int _hex4(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The four hex digits at s[i] (a \\u escape's) as a number; -1 where they are not."""
    cdef int k, h, v = 0
    if i + 4 > n:
        return -1
    for k in range(4):
        h = _hex(s[i + k])
        if h < 0:
            return -1
        v = v * 16 + h
    return v


cdef inline bint _cont(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return i < n and 0x80 <= s[i] <= 0xBF


cdef inline int _utf8(cstr s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The length of the UTF-8 sequence at s[i] (a byte past ASCII) where it is well-formed
    as Unicode's table 3-7 has it (no overlongs, no surrogates); 0 where it is not."""
    cdef unsigned char c = s[i]
    if 0xC2 <= c <= 0xDF:
        return 2 if _cont(s, i + 1, n) else 0
    if i + 1 >= n:
        return 0
    if 0xE0 <= c <= 0xEF:
        if c == 0xE0 and not 0xA0 <= s[i + 1] <= 0xBF:
            return 0
        if c == 0xED and not 0x80 <= s[i + 1] <= 0x9F:
            return 0
        return 3 if _cont(s, i + 1, n) and _cont(s, i + 2, n) else 0
    if 0xF0 <= c <= 0xF4:
        if c == 0xF0 and not 0x90 <= s[i + 1] <= 0xBF:
            return 0
        if c == 0xF4 and not 0x80 <= s[i + 1] <= 0x8F:
            return 0
        return 4 if _cont(s, i + 1, n) and _cont(s, i + 2, n) and _cont(s, i + 3, n) else 0
    return 0

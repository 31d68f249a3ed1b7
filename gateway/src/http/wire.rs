//! HTTP/1 wire primitives shared by the client codec ([`super::h1`]) and
//! the server fast path ([`crate::server`]): header spans over a parse
//! buffer, field and chunk framing. Nothing here does I/O.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// One `name: value` line of a head or trailer section.
pub(crate) fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Where a parsed header's name and value sit in the head's buffer, kept
/// as offsets while the buffer is borrowed by the parser, so the values
/// can then be sliced from it without copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    pub(crate) const EMPTY: Span = Span {
        name: (0, 0),
        value: (0, 0),
    };

    /// The span of `h`, parsed from a buffer starting at address `base`.
    pub(crate) fn of(base: usize, h: &httparse::Header<'_>) -> Span {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        Span {
            name: (n as u32, (n + h.name.len()) as u32),
            value: (v as u32, (v + h.value.len()) as u32),
        }
    }

    pub(crate) fn name(&self) -> std::ops::Range<usize> {
        self.name.0 as usize..self.name.1 as usize
    }

    pub(crate) fn value(&self) -> std::ops::Range<usize> {
        self.value.0 as usize..self.value.1 as usize
    }
}

/// The size line of a chunk (`<hex size>\r\n`), formatted on the stack.
pub(crate) struct ChunkSize {
    buf: [u8; 18],
    start: usize,
}

impl ChunkSize {
    pub(crate) fn new(len: usize) -> ChunkSize {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 18];
        buf[16..].copy_from_slice(b"\r\n");
        let mut start = 16;
        let mut n = len;
        loop {
            start -= 1;
            buf[start] = DIGITS[n & 0xf];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        ChunkSize { buf, start }
    }
}

impl AsRef<[u8]> for ChunkSize {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The last chunk of a chunked body and its trailer section.
pub(crate) fn write_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        write_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Test helpers shared by the codec and server tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// Takes the first complete message off `buf`: a head, and the body
    /// its `content-length` announces (none for a 204). `None` while
    /// incomplete.
    pub(crate) fn take_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = if head.starts_with("http/1.1 204") {
            0
        } else {
            head.lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        (buf.len() >= end + 4 + len).then(|| buf.drain(..end + 4 + len).collect())
    }
}

//! The client's byte-level parsing, free of sockets so it can be unit tested:
//! an HTTP/1.1 response head, a `Transfer-Encoding: chunked` decoder (Node
//! chunks its SSE bodies, the gateway does not), an SSE event parser, and the
//! extraction of the load test's numbers (`"seq"`, `"t_pub_ns"`) from a
//! `data:` line without a full JSON parse.

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub chunked: bool,
    /// Bytes taken by the head, including the blank line.
    pub len: usize,
}

/// Heads longer than this are refused.
pub const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum HeadParse {
    Partial,
    Bad,
    Done(Head),
}

pub fn parse_head(buf: &[u8]) -> HeadParse {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            HeadParse::Bad
        } else {
            HeadParse::Partial
        };
    };
    let Ok(text) = std::str::from_utf8(&buf[..end]) else {
        return HeadParse::Bad;
    };
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
        return HeadParse::Bad;
    };
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        len: end + 4,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => head.content_length = Some(n),
                Err(_) => return HeadParse::Bad,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    HeadParse::Done(head)
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// Decodes a chunked body incrementally.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: Chunk,
    size: usize,
    digits: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size.
    #[default]
    Size,
    /// Skipping a chunk extension up to the LF.
    Extension,
    /// `size` bytes of data remain.
    Data,
    /// Expecting the CRLF after data.
    DataEnd,
    /// The last chunk was seen.
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ChunkError {
    Malformed,
}

impl Dechunker {
    /// Appends the payload bytes of `input` to `out`. `Ok(true)` once the
    /// terminating chunk has been read.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                Chunk::Size => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).unwrap_or(0) as usize;
                            self.digits += 1;
                            if self.digits > 12 {
                                return Err(ChunkError::Malformed);
                            }
                            self.size = self.size * 16 + d;
                        }
                        b'\r' | b';' | b' ' | b'\t' => self.state = Chunk::Extension,
                        b'\n' => self.end_size()?,
                        _ => return Err(ChunkError::Malformed),
                    }
                }
                Chunk::Extension => {
                    if input[i] == b'\n' {
                        self.end_size()?;
                    }
                    i += 1;
                }
                Chunk::Data => {
                    let n = self.size.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.size -= n;
                    if self.size == 0 {
                        self.state = Chunk::DataEnd;
                    }
                }
                Chunk::DataEnd => {
                    match input[i] {
                        b'\r' => {}
                        b'\n' => self.state = Chunk::Size,
                        _ => return Err(ChunkError::Malformed),
                    }
                    i += 1;
                }
                Chunk::Done => return Ok(true),
            }
        }
        Ok(self.state == Chunk::Done)
    }

    fn end_size(&mut self) -> Result<(), ChunkError> {
        if self.digits == 0 {
            return Err(ChunkError::Malformed);
        }
        self.state = if self.size == 0 {
            Chunk::Done
        } else {
            Chunk::Data
        };
        self.digits = 0;
        Ok(())
    }
}

/// One dispatched SSE event.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub name: &'a [u8],
    pub data: &'a [u8],
}

/// An incremental `text/event-stream` parser. Events are handed to a callback
/// as slices of its buffer; only the unfinished tail is kept between feeds.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Start of the event being assembled.
    start: usize,
    /// Where the line scan resumes.
    scan: usize,
}

/// A stream that sends this much without finishing an event is refused.
pub const MAX_EVENT: usize = 1 << 20;

impl SseParser {
    /// Parses `input`; `Err` when an event grows past [`MAX_EVENT`].
    pub fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(Event<'_>)) -> Result<(), ()> {
        self.buf.extend_from_slice(input);
        while let Some(nl) = self.buf[self.scan..].iter().position(|&b| b == b'\n') {
            let line_end = self.scan + nl;
            let line = trim_cr(&self.buf[self.scan..line_end]);
            self.scan = line_end + 1;
            if line.is_empty() {
                dispatch(&self.buf[self.start..line_end], &mut on_event);
                self.start = self.scan;
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scan -= self.start;
            self.start = 0;
        }
        if self.buf.len() > MAX_EVENT {
            return Err(());
        }
        Ok(())
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Dispatches the event made of `block`'s lines, when it has data. Only the
/// first `data:` line is kept: every frame of the contract has exactly one.
fn dispatch(block: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
    let mut name: &[u8] = b"message";
    let mut data: Option<&[u8]> = None;
    for line in block.split(|&b| b == b'\n') {
        let line = trim_cr(line);
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => name = value,
            b"data" if data.is_none() => data = Some(value),
            _ => {}
        }
    }
    if let Some(data) = data {
        on_event(Event { name, data });
    }
}

/// The unsigned integer after `"key":` in `json`, by byte search.
pub fn json_u64(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(json, key)? + key.len();
    let rest = &json[at..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse() {
        let h = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nxyz";
        assert_eq!(
            parse_head(h),
            HeadParse::Done(Head {
                status: 200,
                content_length: None,
                chunked: true,
                len: h.len() - 3
            })
        );
        let h = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 12\r\n\r\n";
        match parse_head(h) {
            HeadParse::Done(h) => assert_eq!((h.status, h.content_length), (429, Some(12))),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n"), HeadParse::Partial);
        assert_eq!(parse_head(b"SSH-2.0\r\n\r\n"), HeadParse::Bad);
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            HeadParse::Bad
        );
    }

    #[test]
    fn chunks_decode_across_any_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..body.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            let a = d.feed(&body[..split], &mut out).unwrap();
            let b = d.feed(&body[split..], &mut out).unwrap();
            assert!(a || b, "split {split}");
            assert_eq!(out, b"hello, world");
        }
        let mut d = Dechunker::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn events_parse_across_any_split() {
        let stream = b"retry: 3000\n: connected\n\nid: 1-1\nevent: realtime-update\ndata: {\"seq\":7}\n\nevent: system\r\ndata: {\"kind\":\"heartbeat\"}\r\n\r\n";
        for split in 0..stream.len() {
            let mut p = SseParser::default();
            let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                p.feed(part, |e| got.push((e.name.to_vec(), e.data.to_vec())))
                    .unwrap();
            }
            assert_eq!(
                got,
                vec![
                    (b"realtime-update".to_vec(), b"{\"seq\":7}".to_vec()),
                    (b"system".to_vec(), b"{\"kind\":\"heartbeat\"}".to_vec()),
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn numbers_are_found() {
        let d = br#"{"deviceId":"d17","data":{"seq":42,"t_pub_ns": 1769000000000000000},"timestamp":"x"}"#;
        assert_eq!(json_u64(d, b"\"seq\":"), Some(42));
        assert_eq!(
            json_u64(d, b"\"t_pub_ns\":"),
            Some(1_769_000_000_000_000_000)
        );
        assert_eq!(json_u64(d, b"\"nope\":"), None);
        assert_eq!(json_u64(br#"{"seq":"x"}"#, b"\"seq\":"), None);
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
    }
}

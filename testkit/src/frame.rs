//! The repository's one `text/event-stream` parser, shared by the black-box
//! tests (through [`SseStream`](crate::SseStream), which wants owned
//! [`Frame`]s) and the load harness's many-stream client (through
//! [`FrameReader`], which wants no allocation per event).
//!
//! Both sit on [`parse_block`]: it finds the first complete block of a buffer
//! and returns its fields as slices of that buffer. Lines end with CRLF, LF or
//! a lone CR, as the EventSource specification says; a CR at the very end of
//! the buffer waits for the next byte (it may be the first half of a CRLF)
//! unless the stream has ended.

use std::borrow::Cow;

use serde_json::Value;

/// One block, up to and including its blank line, borrowed from the buffer
/// it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block<'a> {
    /// The exact bytes of the block (stray blank lines before it and the
    /// closing blank line included).
    pub raw: &'a [u8],
    pub id: Option<&'a [u8]>,
    pub event: Option<&'a [u8]>,
    /// The `data` lines joined with `\n`; None when there were none. Borrowed
    /// when the block has one `data` line, as every frame of the contract has.
    pub data: Option<Cow<'a, [u8]>>,
    pub retry: Option<u64>,
    /// Whether the block held a comment line (`:`...).
    pub comment: bool,
}

/// Where the line starting at `from` ends: (end of its text, start of the
/// next line). None when no terminator has arrived yet.
fn line_at(buf: &[u8], from: usize, eof: bool) -> Option<(usize, usize)> {
    let end = from + memchr::memchr2(b'\n', b'\r', &buf[from..])?;
    let mut next = end + 1;
    if buf[end] == b'\r' {
        match buf.get(next) {
            Some(b'\n') => next += 1,
            None if !eof => return None,
            _ => {}
        }
    }
    Some((end, next))
}

/// Parses the first complete block of `buf`; returns it and its length.
pub fn parse_block(buf: &[u8], eof: bool) -> Option<(Block<'_>, usize)> {
    // First find where the block ends, so an incomplete one costs nothing.
    let (mut pos, mut has_lines) = (0, false);
    loop {
        let (end, next) = line_at(buf, pos, eof)?;
        let blank = end == pos;
        pos = next;
        if blank && has_lines {
            break;
        }
        // A stray blank line dispatches nothing; it stays in the raw bytes of
        // the block that follows so none is lost.
        has_lines |= !blank;
    }
    let mut block = Block {
        raw: &buf[..pos],
        id: None,
        event: None,
        data: None,
        retry: None,
        comment: false,
    };
    let mut at = 0;
    while let Some((end, next)) = line_at(block.raw, at, true) {
        let line = &block.raw[at..end];
        at = next;
        if line.is_empty() {
            continue;
        }
        if line[0] == b':' {
            block.comment = true;
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                block.data = Some(match block.data.take() {
                    None => Cow::Borrowed(value),
                    Some(before) => {
                        let mut joined = before.into_owned();
                        joined.push(b'\n');
                        joined.extend_from_slice(value);
                        Cow::Owned(joined)
                    }
                })
            }
            b"event" => block.event = Some(value),
            b"id" if !value.contains(&0) => block.id = Some(value),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                block.retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok())
            }
            _ => {}
        }
    }
    Some((block, pos))
}

/// One block as owned strings, for tests that keep and inspect frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The `data` lines joined with `\n` (empty when there were none).
    pub data: String,
    pub retry: Option<u64>,
    /// Whether the block held a comment line (`:`...).
    pub comment: bool,
    /// The exact bytes of the block, blank line included.
    pub raw: String,
}

impl From<Block<'_>> for Frame {
    fn from(b: Block<'_>) -> Frame {
        let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        Frame {
            id: b.id.map(text),
            event: b.event.map(text),
            data: b.data.as_deref().map(text).unwrap_or_default(),
            retry: b.retry,
            comment: b.comment,
            raw: text(b.raw),
        }
    }
}

impl Frame {
    /// `data` as JSON; panics (showing the frame) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("frame data is not JSON ({e}): {:?}", self.raw))
    }

    /// Whether this is an `event: system` with `"kind": kind`.
    pub fn is_system(&self, kind: &str) -> bool {
        self.event.as_deref() == Some("system")
            && serde_json::from_str::<Value>(&self.data)
                .is_ok_and(|v| v["kind"].as_str() == Some(kind))
    }

    pub fn is_heartbeat(&self) -> bool {
        self.is_system("heartbeat")
    }

    /// A block that dispatches nothing: no event and no data (preamble,
    /// comments, retry-only).
    pub fn is_control(&self) -> bool {
        self.event.is_none() && self.data.is_empty()
    }
}

/// [`parse_block`] as an owned [`Frame`].
pub fn parse_frame(buf: &[u8], eof: bool) -> Option<(Frame, usize)> {
    parse_block(buf, eof).map(|(b, n)| (Frame::from(b), n))
}

/// A stream that sends this much without finishing a block is refused.
pub const MAX_FRAME: usize = 1 << 20;

/// Why [`FrameReader::feed`] gave up on a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameTooLarge;

/// An incremental reader for a non-blocking client: feed it what each read
/// returned; complete blocks are handed out as slices, and only an
/// unfinished tail is kept between feeds.
#[derive(Debug, Default)]
pub struct FrameReader {
    tail: Vec<u8>,
}

impl FrameReader {
    /// Hands every block completed by `input` to `on_block`; Err when an
    /// unfinished block grows past [`MAX_FRAME`].
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_block: impl FnMut(Block<'_>),
    ) -> Result<(), FrameTooLarge> {
        if self.tail.is_empty() {
            let used = each_block(input, &mut on_block);
            self.tail.extend_from_slice(&input[used..]);
        } else {
            self.tail.extend_from_slice(input);
            let used = each_block(&self.tail, &mut on_block);
            self.tail.drain(..used);
        }
        if self.tail.len() > MAX_FRAME {
            return Err(FrameTooLarge);
        }
        Ok(())
    }
}

/// Calls `on_block` for each complete block of `buf`; returns the bytes used.
fn each_block(buf: &[u8], on_block: &mut impl FnMut(Block<'_>)) -> usize {
    let mut used = 0;
    while let Some((block, n)) = parse_block(&buf[used..], false) {
        on_block(block);
        used += n;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b"retry: 3000\n: connected\n\nid: 1-1\nevent: realtime-update\ndata: {\"seq\":7}\n\nevent: system\r\ndata: {\"kind\":\"heartbeat\"}\r\n\r\ndata: a\rdata: b\r\r";

    /// What a block dispatched: its event name and data.
    type Dispatched = (Option<Vec<u8>>, Option<Vec<u8>>);

    fn events(chunks: &[&[u8]]) -> Vec<Dispatched> {
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for chunk in chunks {
            r.feed(chunk, |b| {
                got.push((b.event.map(<[u8]>::to_vec), b.data.map(Cow::into_owned)))
            })
            .unwrap();
        }
        got
    }

    #[test]
    fn blocks_parse_across_any_split() {
        let whole = events(&[STREAM]);
        // The last block ends with a lone CR: it waits for the byte after it.
        assert_eq!(whole.len(), 3);
        let completed = events(&[STREAM, b"\n"]);
        assert_eq!(
            completed,
            vec![
                (None, None),
                (
                    Some(b"realtime-update".to_vec()),
                    Some(b"{\"seq\":7}".to_vec())
                ),
                (
                    Some(b"system".to_vec()),
                    Some(b"{\"kind\":\"heartbeat\"}".to_vec())
                ),
                (None, Some(b"a\nb".to_vec())),
            ]
        );
        for split in 0..STREAM.len() {
            let got = events(&[&STREAM[..split], &STREAM[split..], b"\n"]);
            assert_eq!(got, completed, "split {split}");
        }
    }

    #[test]
    fn frames_keep_every_field_and_byte() {
        let (f, n) = parse_frame(
            b"\nid: 5-2\nretry: 10\nevent: x\n: c\ndata: {}\n\nrest",
            false,
        )
        .unwrap();
        assert_eq!(n, 42);
        assert_eq!(f.id.as_deref(), Some("5-2"));
        assert_eq!((f.retry, f.comment), (Some(10), true));
        assert_eq!((f.event.as_deref(), f.data.as_str()), (Some("x"), "{}"));
        assert!(f.raw.starts_with("\nid:") && f.raw.ends_with("{}\n\n"));
        let (f, _) = parse_frame(b"id: a\0b\nretry: 1x\ndata\n\n", true).unwrap();
        assert_eq!((f.id, f.retry, f.data.as_str()), (None, None, ""));
        assert_eq!(parse_frame(b"data: x\n", true), None);
        assert_eq!(parse_frame(b"data: x\r\r", false), None);
        assert!(parse_frame(b"data: x\r\r", true).is_some());
    }

    #[test]
    fn an_endless_block_is_refused() {
        let mut r = FrameReader::default();
        let line = vec![b'x'; MAX_FRAME / 2];
        assert_eq!(r.feed(&line, |_| {}), Ok(()));
        assert_eq!(r.feed(&line, |_| {}), Ok(()));
        assert_eq!(r.feed(b"x", |_| {}), Err(FrameTooLarge));
    }
}

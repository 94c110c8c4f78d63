//! A stream's body bytes as the client receives them, before and after the
//! kit's SSE parser: a `Transfer-Encoding: chunked` decoder (Node chunks its
//! SSE bodies, the gateway does not), and the load test's numbers (`"seq"`,
//! `"t_pub_ns"`) read from a `data:` line without a full JSON parse.

use sse_testkit::find;

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
    fn numbers_are_found() {
        let d = br#"{"deviceId":"d17","data":{"seq":42,"t_pub_ns": 1769000000000000000},"timestamp":"x"}"#;
        assert_eq!(json_u64(d, b"\"seq\":"), Some(42));
        assert_eq!(
            json_u64(d, b"\"t_pub_ns\":"),
            Some(1_769_000_000_000_000_000)
        );
        assert_eq!(json_u64(d, b"\"nope\":"), None);
        assert_eq!(json_u64(br#"{"seq":"x"}"#, b"\"seq\":"), None);
    }
}

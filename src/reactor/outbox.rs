//! A connection's unsent bytes: shared frames and owned buffers in order,
//! written with one call of everything queued: a plain `write` for one
//! slice (the common case: one frame since the last flush), a vectored
//! write of up to [`MAX_IOVECS`] slices otherwise. A frame fanned out to
//! 10,000 streams is 10,000 `Arc` clones of one buffer, never 10,000 copies.
//!
//! The ring of chunks keeps its room after a flush: the reactor gives it
//! back ([`Outbox::trim`]) when a stream is not being written often, so a
//! stream with traffic never allocates per frame and an idle one holds no
//! buffer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use crate::stream::frame::Frame;

/// Slices per `writev`: enough to batch a busy stream's backlog, small enough
/// to live on the stack.
pub const MAX_IOVECS: usize = 128;

pub enum Chunk {
    Frame(Arc<Frame>),
    Bytes(Vec<u8>),
}

impl Chunk {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Chunk::Frame(f) => &f.bytes,
            Chunk::Bytes(b) => b,
        }
    }
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket is full; wait for it to become writable.
    Blocked,
}

/// Behind one pointer, and none at all while nothing is queued and the
/// room was given back: most streams are idle most of their life, and a
/// ring inline would cost each of their rows 48 bytes, not 8.
#[derive(Default)]
pub struct Outbox(Option<Box<Ring>>);

/// The chunks and where the writing stands in them.
#[derive(Default)]
struct Ring {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Unsent bytes in all chunks.
    queued: usize,
}

impl Outbox {
    pub fn push(&mut self, chunk: Chunk) {
        let n = chunk.as_bytes().len();
        if n > 0 {
            let ring = self.0.get_or_insert_default();
            ring.queued += n;
            ring.chunks.push_back(chunk);
        }
    }

    pub fn push_frame(&mut self, frame: &Arc<Frame>) {
        self.push(Chunk::Frame(frame.clone()));
    }

    pub fn push_bytes(&mut self, bytes: Vec<u8>) {
        self.push(Chunk::Bytes(bytes));
    }

    /// Unsent bytes.
    pub fn queued(&self) -> usize {
        self.0.as_ref().map_or(0, |r| r.queued)
    }

    pub fn is_empty(&self) -> bool {
        self.queued() == 0
    }

    /// Gives back all the room an empty outbox holds (the reactor calls it
    /// after flushing a stream not written for a while, and at heartbeats).
    pub fn trim(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }

    /// Chunks the ring has room for (what an idle stream should not hold).
    #[cfg(test)]
    pub fn room(&self) -> usize {
        self.0.as_ref().map_or(0, |r| r.chunks.capacity())
    }

    pub fn clear(&mut self) {
        if let Some(ring) = &mut self.0 {
            ring.chunks.clear();
            ring.offset = 0;
            ring.queued = 0;
        }
    }

    /// Writes as much as the socket takes: one `write` for a lone chunk, one
    /// vectored write per up to [`MAX_IOVECS`] chunks otherwise. A short
    /// write means the socket buffer is full, so it stops there instead of
    /// paying for a call that would return EAGAIN.
    pub fn flush<W: Write>(&mut self, out: &mut W) -> io::Result<Flushed> {
        match &mut self.0 {
            Some(ring) => ring.flush(out),
            None => Ok(Flushed::All),
        }
    }
}

impl Ring {
    fn flush<W: Write>(&mut self, out: &mut W) -> io::Result<Flushed> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            let mut offered = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let bytes = chunk.as_bytes();
                let bytes = if i == 0 { &bytes[self.offset..] } else { bytes };
                slices[i] = IoSlice::new(bytes);
                offered += bytes.len();
                n = i + 1;
            }
            let sent = if n == 1 {
                out.write(&slices[0])
            } else {
                out.write_vectored(&slices[..n])
            };
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    self.advance(written);
                    if written < offered {
                        return Ok(Flushed::Blocked);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Flushed::All)
    }

    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.as_bytes().len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::frame::Event;

    /// A socket that takes at most `room` bytes per call and `budget` in all.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
        budget: usize,
        calls: usize,
        /// Calls that were a plain `write`.
        plain: usize,
    }

    impl Pipe {
        fn unbounded() -> Pipe {
            Pipe {
                got: vec![],
                room: usize::MAX,
                budget: usize::MAX,
                calls: 0,
                plain: 0,
            }
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.plain += 1;
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n).min(self.budget);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                self.budget -= take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(data: &str) -> Arc<Frame> {
        Arc::new(Frame::encode(None, Event::System, "", data.as_bytes()))
    }

    #[test]
    fn one_writev_sends_everything_queued() {
        let mut o = Outbox::default();
        o.push_bytes(b"head;".to_vec());
        let f = frame("x");
        for _ in 0..3 {
            o.push_frame(&f);
        }
        let mut pipe = Pipe::unbounded();
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::All);
        assert_eq!(pipe.calls, 1);
        let mut want = b"head;".to_vec();
        for _ in 0..3 {
            want.extend_from_slice(&f.bytes);
        }
        assert_eq!(pipe.got, want);
        assert!(o.is_empty());
        assert_eq!(Arc::strong_count(&f), 1, "written frames are released");
    }

    #[test]
    fn an_outbox_is_one_pointer_and_a_trim_with_bytes_queued_keeps_them() {
        assert_eq!(std::mem::size_of::<Outbox>(), 8);
        let mut o = Outbox::default();
        assert_eq!(o.flush(&mut Pipe::unbounded()).unwrap(), Flushed::All);
        let f = frame("x");
        o.push_frame(&f);
        o.trim();
        assert_eq!(o.queued(), f.bytes.len(), "trim never drops unsent bytes");
        let mut pipe = Pipe::unbounded();
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::All);
        assert_eq!(pipe.got, f.bytes.to_vec());
        o.clear();
        assert!(o.is_empty());
    }

    #[test]
    fn a_lone_chunk_is_one_plain_write_and_the_ring_keeps_its_room() {
        let mut o = Outbox::default();
        let f = frame("x");
        let mut pipe = Pipe::unbounded();
        for round in 1..=3 {
            o.push_frame(&f);
            assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::All);
            assert_eq!((pipe.calls, pipe.plain), (round, round));
            assert!(o.room() > 0, "no allocation per frame");
        }
        o.trim();
        assert_eq!(o.room(), 0);
        assert!(o.0.is_none(), "a trimmed outbox holds no ring");
        o.push_frame(&f);
        o.push_frame(&f);
        o.flush(&mut pipe).unwrap();
        assert_eq!(
            (pipe.calls, pipe.plain),
            (4, 3),
            "two chunks: one vectored call"
        );
    }

    #[test]
    fn partial_writes_resume_at_the_exact_byte() {
        for room in 1..40 {
            let mut o = Outbox::default();
            let mut want = Vec::new();
            for i in 0..7 {
                let f = frame(&format!("{{\"n\":{i}}}"));
                want.extend_from_slice(&f.bytes);
                o.push_frame(&f);
            }
            let mut pipe = Pipe {
                got: vec![],
                room,
                budget: usize::MAX,
                calls: 0,
                plain: 0,
            };
            let mut turns = 0;
            while o.flush(&mut pipe).unwrap() == Flushed::Blocked {
                turns += 1;
                assert!(turns < 10_000);
            }
            assert_eq!(pipe.got, want, "room {room}");
            assert_eq!(o.queued(), 0);
        }
    }

    #[test]
    fn a_full_socket_blocks_and_keeps_the_backlog() {
        let mut o = Outbox::default();
        o.push_bytes(vec![b'a'; 100]);
        let mut pipe = Pipe {
            got: vec![],
            room: usize::MAX,
            budget: 30,
            calls: 0,
            plain: 0,
        };
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::Blocked);
        assert_eq!(o.queued(), 70);
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::Blocked);
        pipe.budget = 1000;
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::All);
        assert_eq!(pipe.got.len(), 100);
    }

    #[test]
    fn more_chunks_than_iovecs_take_several_calls() {
        let mut o = Outbox::default();
        let f = frame("y");
        for _ in 0..(MAX_IOVECS * 2 + 1) {
            o.push_frame(&f);
        }
        let mut pipe = Pipe::unbounded();
        assert_eq!(o.flush(&mut pipe).unwrap(), Flushed::All);
        assert_eq!(pipe.calls, 3);
        assert_eq!(pipe.got.len(), f.len() * (MAX_IOVECS * 2 + 1));
    }
}

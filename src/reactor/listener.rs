//! Listening sockets, one per reactor, all bound to the same address with
//! SO_REUSEPORT so the kernel spreads new connections over the reactors (and
//! over several gateway processes on one port, the way one box outgrows the
//! per-process descriptor limit).
//!
//! `TCP_NODELAY` is set once, on the listener: Linux copies it to every
//! connection the listener accepts, which saves a `setsockopt` per open
//! (a frame is written whole, so Nagle would only delay it).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 8192;

pub fn bind(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Binds `count` listeners on `addr`. When `addr` asks for port 0, the first
/// listener's port is used for the rest so they all share one.
pub fn bind_all(addr: SocketAddr, count: usize) -> io::Result<Vec<mio::net::TcpListener>> {
    let first = bind(addr)?;
    let shared = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..count {
        out.push(bind(shared)?);
    }
    Ok(out)
}

/// Accept errors that mean "out of descriptors or memory": back off, do not spin.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_nodelay() -> io::Result<()> {
        let listener = bind("127.0.0.1:0".parse().map_err(io::Error::other)?)?;
        let _client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let accepted = loop {
            match listener.accept() {
                Ok((socket, _)) => break socket,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing accepted");
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        };
        assert!(accepted.nodelay()?);
        Ok(())
    }
}

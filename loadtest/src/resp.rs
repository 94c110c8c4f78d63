//! A minimal blocking Redis client (RESP2): enough to seed ownership sets in
//! pipelined batches and to check that a server answers. The publisher
//! writes its own pipelined PUBLISH stream on top of [`encode`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A reply, reduced to what the harness looks at.
#[derive(Debug, PartialEq, Eq)]
pub enum Value {
    Ok(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Value>),
    Error(String),
}

/// Appends one command to `out` in RESP form.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

pub struct Redis {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Redis {
    pub fn connect(addr: SocketAddr) -> Result<Redis, String> {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr} is not loopback"));
        }
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("redis {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let r = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Redis {
            writer: s,
            reader: BufReader::new(r),
        })
    }

    /// Sends every command in one write, then reads one reply per command.
    pub fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            encode(&mut out, &args);
        }
        self.writer.write_all(&out).map_err(|e| e.to_string())?;
        (0..cmds.len())
            .map(|_| read_value(&mut self.reader))
            .collect()
    }

    pub fn cmd(&mut self, args: &[&str]) -> Result<Value, String> {
        let c: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        self.pipeline(&[c])?
            .pop()
            .ok_or_else(|| "no reply".to_string())
    }
}

/// Reads one reply; `Err` on I/O or protocol errors.
pub fn read_value(r: &mut impl BufRead) -> Result<Value, String> {
    let mut line = Vec::new();
    read_line(r, &mut line)?;
    let (kind, rest) = line.split_first().ok_or("empty reply")?;
    let text = String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Value::Ok(text)),
        b'-' => Ok(Value::Error(text)),
        b':' => text
            .parse()
            .map(Value::Int)
            .map_err(|_| format!("bad integer {text}")),
        b'$' => {
            let n: i64 = text.parse().map_err(|_| format!("bad length {text}"))?;
            if n < 0 {
                return Ok(Value::Bulk(None));
            }
            if n > 512 << 20 {
                return Err("bulk too large".into());
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n as usize);
            Ok(Value::Bulk(Some(buf)))
        }
        b'*' => {
            let n: i64 = text.parse().map_err(|_| format!("bad length {text}"))?;
            if n > 1 << 20 {
                return Err("array too large".into());
            }
            (0..n.max(0))
                .map(|_| read_value(r))
                .collect::<Result<_, _>>()
                .map(Value::Array)
        }
        _ => Err(format!("bad reply type {}", *kind as char)),
    }
}

fn read_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> Result<(), String> {
    line.clear();
    let n = r
        .take(64 * 1024)
        .read_until(b'\n', line)
        .map_err(|e| e.to_string())?;
    if n == 0 || !line.ends_with(b"\r\n") {
        return Err("connection closed or bad line".into());
    }
    line.truncate(line.len() - 2);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SADD", b"k", b"v"]);
        assert_eq!(out, b"*3\r\n$4\r\nSADD\r\n$1\r\nk\r\n$1\r\nv\r\n");
        let mut r: &[u8] = b"+OK\r\n:3\r\n$-1\r\n$2\r\nhi\r\n*2\r\n:1\r\n-ERR x\r\n";
        assert_eq!(read_value(&mut r).unwrap(), Value::Ok("OK".into()));
        assert_eq!(read_value(&mut r).unwrap(), Value::Int(3));
        assert_eq!(read_value(&mut r).unwrap(), Value::Bulk(None));
        assert_eq!(
            read_value(&mut r).unwrap(),
            Value::Bulk(Some(b"hi".to_vec()))
        );
        assert_eq!(
            read_value(&mut r).unwrap(),
            Value::Array(vec![Value::Int(1), Value::Error("ERR x".into())])
        );
        assert!(read_value(&mut r).is_err());
    }
}

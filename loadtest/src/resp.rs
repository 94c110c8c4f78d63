//! A minimal blocking Redis client (RESP2): enough to seed ownership sets in
//! pipelined batches and to check that a server answers. The publisher
//! writes its own pipelined PUBLISH stream on top of [`encode`].
//!
//! A Redis is named by a [`RedisAt`]: an address, and for a deployment's
//! own Redis (`loadtest run --grant-redis`/`--publish-redis`) the password,
//! user and database of its `redis://` URL, sent as `AUTH` and `SELECT`
//! before anything else. No TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long connecting to a Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a Redis is and how to log in to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisAt {
    pub addr: SocketAddr,
    /// `AUTH [user] password`, when the URL has a password.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `SELECT db` when not 0.
    pub db: u32,
}

impl From<SocketAddr> for RedisAt {
    /// A Redis the harness started itself: no password, database 0.
    fn from(addr: SocketAddr) -> RedisAt {
        RedisAt {
            addr,
            user: None,
            password: None,
            db: 0,
        }
    }
}

impl RedisAt {
    /// `redis://[[user]:password@]HOST:PORT[/db]`, user and password
    /// percent-decoded. `rediss://` (TLS) is refused by name.
    pub fn parse(url: &str) -> Result<RedisAt, String> {
        // Errors name the URL without its password.
        let shown = without_password(url);
        if url.starts_with("rediss://") {
            return Err(format!(
                "{shown}: TLS (rediss://) is not supported by the harness"
            ));
        }
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{shown}: expected redis://[[user]:password@]HOST:PORT[/db]"))?;
        let (rest, db) = match rest.split_once('/') {
            Some((r, "")) => (r, 0),
            Some((r, db)) => (
                r,
                db.parse()
                    .map_err(|_| format!("{shown}: the database must be a number"))?,
            ),
            None => (rest, 0),
        };
        let (login, authority) = match rest.rsplit_once('@') {
            Some((login, authority)) => (Some(login), authority),
            None => (None, rest),
        };
        let (user, password) = match login.map(|l| l.split_once(':')) {
            None => (None, None),
            Some(None) => return Err(format!("{shown}: a login needs `:password`")),
            Some(Some((user, password))) => (
                Some(percent_decode(user, &shown)?).filter(|u| !u.is_empty()),
                Some(percent_decode(password, &shown)?),
            ),
        };
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| format!("{shown}: {e}"))?
            .next()
            .ok_or_else(|| format!("{shown}: no address"))?;
        Ok(RedisAt {
            addr,
            user,
            password,
            db,
        })
    }

    /// Connects and logs in: `AUTH` and `SELECT` as the URL asks, each
    /// answered before this returns.
    pub fn connect(&self) -> Result<TcpStream, String> {
        let addr = self.addr;
        let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("redis {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let mut hello = Vec::new();
        let mut asked = 0;
        if let Some(password) = &self.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            args.extend(self.user.as_deref().map(str::as_bytes));
            args.push(password.as_bytes());
            encode(&mut hello, &args);
            asked += 1;
        }
        if self.db != 0 {
            encode(&mut hello, &[b"SELECT", self.db.to_string().as_bytes()]);
            asked += 1;
        }
        if asked == 0 {
            return Ok(s);
        }
        s.set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.write_all(&hello)
            .map_err(|e| format!("redis {addr}: {e}"))?;
        // Byte by byte (no buffer that could swallow what follows): the
        // replies are a few bytes each.
        let mut reader = BufReader::with_capacity(1, &s);
        for _ in 0..asked {
            if let Value::Error(e) = read_value(&mut reader)? {
                return Err(format!("redis {addr}: {e}"));
            }
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(s)
    }
}

/// `text` with the password of a `redis://user:password@…` URL in it
/// replaced by `<secret>` (for reports); anything else as it is.
pub fn without_password(text: &str) -> String {
    let Some((scheme, rest)) = ["redis://", "rediss://"]
        .iter()
        .find_map(|s| text.strip_prefix(s).map(|rest| (s, rest)))
    else {
        return text.to_owned();
    };
    match rest.rsplit_once('@') {
        // `user:password@`: the user stays; a login without a colon may
        // be a password alone.
        Some((login, authority)) => match login.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:<secret>@{authority}"),
            None => format!("{scheme}<secret>@{authority}"),
        },
        None => text.to_owned(),
    }
}

/// A URL's user or password with its `%XX` escapes decoded, by the
/// gateway's own strict decoder (a malformed escape is an error).
fn percent_decode(text: &str, url: &str) -> Result<String, String> {
    sse_gateway::http::query::decode(text)
        .map(|d| d.into_owned())
        .ok_or_else(|| format!("{url}: a bad %-escape in the login"))
}

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
    pub fn connect(at: impl Into<RedisAt>) -> Result<Redis, String> {
        let s = at.into().connect()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
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

    #[test]
    fn redis_urls_name_the_login_and_database() {
        let at = RedisAt::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(
            at,
            RedisAt::from("127.0.0.1:6379".parse::<SocketAddr>().unwrap())
        );
        assert_eq!(RedisAt::parse("redis://127.0.0.1:6379/").unwrap().db, 0);
        let at = RedisAt::parse("redis://:p%40ss@127.0.0.1:1/3").unwrap();
        assert_eq!(
            (at.user, at.password, at.db),
            (None, Some("p@ss".into()), 3)
        );
        // A '+' is a '+' in a password, not a space.
        let at = RedisAt::parse("redis://:a+b@127.0.0.1:1").unwrap();
        assert_eq!(at.password.as_deref(), Some("a+b"));
        let at = RedisAt::parse("redis://app:pw@localhost:7000").unwrap();
        assert_eq!(
            (at.user.as_deref(), at.password.as_deref()),
            (Some("app"), Some("pw"))
        );
        // Any host, not only loopback: the address is resolved, not contacted.
        assert_eq!(
            RedisAt::parse("redis://192.0.2.7:6380")
                .unwrap()
                .addr
                .port(),
            6380
        );
        for (url, shown) in [
            ("redis://app:pw@h:1/2", "redis://app:<secret>@h:1/2"),
            ("rediss://:pw@h:1", "rediss://:<secret>@h:1"),
            ("redis://pw@h:1", "redis://<secret>@h:1"),
            ("redis://h:1", "redis://h:1"),
        ] {
            assert_eq!(without_password(url), shown);
        }
        let refused = RedisAt::parse("redis://:pw@127.0.0.1:1/x").unwrap_err();
        assert!(
            refused.contains("database") && !refused.contains("pw"),
            "{refused}"
        );
        for bad in [
            "rediss://127.0.0.1:1",
            "http://127.0.0.1:1",
            "redis://pw@127.0.0.1:1",
            "redis://:%zz@127.0.0.1:1",
            "redis://:%+1@127.0.0.1:1",
            "redis://127.0.0.1:1/x",
        ] {
            assert!(RedisAt::parse(bad).is_err(), "{bad}");
        }
    }
}

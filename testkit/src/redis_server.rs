//! [`Redis`]: a private `redis-server` on a free loopback port for one test,
//! stopped, paused or restarted on demand and SIGKILLed (by its own PID) on
//! drop. [`redis_server_args`] is the configuration every private server of
//! the repository runs with, the load harness's included.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::probe::{free_port, wait_until};

/// `redis-server` arguments for a private, persistence-free server on
/// `127.0.0.1:port` whose working directory is `dir`.
pub fn redis_server_args(port: u16, dir: &Path) -> Vec<OsString> {
    let port = port.to_string();
    let mut args: Vec<OsString> = ["--port", &port, "--bind", "127.0.0.1"]
        .into_iter()
        .chain(["--save", "", "--appendonly", "no", "--dir"])
        .map(OsString::from)
        .collect();
    args.push(dir.as_os_str().to_owned());
    args
}

/// A private `redis-server` on a free loopback port; SIGKILLed (by its own
/// PID) on drop.
pub struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server and waits (at most 5 s) until it answers PING.
    pub fn start() -> Redis {
        for _ in 0..3 {
            let mut r = Redis {
                port: free_port(),
                child: None,
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("/usr/bin/redis-server")
            .args(redis_server_args(self.port, &std::env::temp_dir()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn /usr/bin/redis-server");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(5), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true; // exited: stop waiting, reported below
            }
            self.ping()
        });
        if up && self.ping() {
            return true;
        }
        self.kill();
        false
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut con)
            .is_ok_and(|p| p == "PONG")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A fresh connection with 5 s I/O timeouts.
    pub fn con(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect to test redis");
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        con
    }

    /// Kills the server (an outage); [`Redis::restart`] brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Freezes the server (SIGSTOP): it holds connections but answers
    /// nothing until [`Redis::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("redis is running").id();
        // SAFETY: kill(2) on the PID of our own child process.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Starts the server again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        let ok = self.spawn();
        assert!(ok, "redis-server did not restart on port {}", self.port);
    }

    /// `PUBLISH channel payload`; returns the number of receivers.
    pub fn publish(&self, channel: &str, payload: &str) -> u64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.con())
            .expect("PUBLISH")
    }

    /// `SADD user:<user>:devices <devices...>`.
    pub fn grant(&self, user: &str, devices: &[&str]) {
        redis::cmd("SADD")
            .arg(format!("user:{user}:devices"))
            .arg(devices)
            .query::<()>(&mut self.con())
            .expect("SADD");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

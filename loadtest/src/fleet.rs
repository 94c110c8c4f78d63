//! The coordinator's side of the worker processes: the binary re-executes
//! itself as `loadtest worker <i>`, one per few thousand streams (each process
//! may hold at most 20,000 descriptors here), and talks to each over its
//! stdin/stdout pipes. Every wait is bounded; dropping the fleet ends the
//! workers by PID.

use std::io::Write;
use std::process::{Child, ChildStdin, Command as Cmd, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::hist::Histogram;
use crate::proc;
use crate::protocol::{Check, Command, Reply, Stats};

struct Worker {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
}

pub struct Fleet {
    workers: Vec<Worker>,
}

/// Stats of every worker added up.
#[derive(Debug, Default)]
pub struct Totals {
    pub stats: Stats,
    pub hist: Histogram,
    /// Close-to-reopen times of resumed streams.
    pub resume: Histogram,
}

impl Fleet {
    pub fn spawn(count: usize) -> Result<Fleet, String> {
        let exe = proc::self_exe();
        let mut fleet = Fleet {
            workers: Vec::new(),
        };
        for i in 0..count {
            let mut cmd = Cmd::new(&exe);
            cmd.arg("worker")
                .arg(i.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            proc::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                proc::stop(child.id(), Duration::from_secs(1));
                return Err("worker pipes missing".into());
            };
            let rx = proc::lines(stdout);
            fleet.workers.push(Worker {
                child,
                stdin,
                replies: rx,
            });
        }
        Ok(fleet)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Sends `cmd(i)` to each worker `i` and waits for every reply.
    pub fn each(
        &mut self,
        timeout: Duration,
        cmd: impl Fn(usize) -> Command,
    ) -> Result<Vec<Reply>, String> {
        for (i, w) in self.workers.iter_mut().enumerate() {
            let line = serde_json::to_string(&cmd(i)).map_err(|e| e.to_string())?;
            writeln!(w.stdin, "{line}").map_err(|e| format!("worker {i}: {e}"))?;
            w.stdin.flush().map_err(|e| format!("worker {i}: {e}"))?;
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = w
                .replies
                .recv_timeout(left)
                .map_err(|_| format!("worker {i} did not answer within {timeout:?}"))?;
            let reply: Reply =
                serde_json::from_str(&line).map_err(|e| format!("worker {i} said {line}: {e}"))?;
            if let Reply::Error { message } = &reply {
                return Err(format!("worker {i}: {message}"));
            }
            out.push(reply);
        }
        Ok(out)
    }

    pub fn all(&mut self, cmd: Command) -> Result<Vec<Reply>, String> {
        self.each(Duration::from_secs(30), |_| cmd.clone())
    }

    pub fn stats(&mut self) -> Result<Totals, String> {
        let mut t = Totals::default();
        for reply in self.all(Command::Stats)? {
            let Reply::Stats(s) = reply else {
                return Err("expected stats".into());
            };
            t.hist.merge(&s.latency);
            t.resume.merge(&s.resume);
            let a = &mut t.stats;
            a.clients += s.clients;
            a.open_now += s.open_now;
            a.opened += s.opened;
            a.failed += s.failed;
            a.pending += s.pending;
            a.events += s.events;
            a.heartbeats += s.heartbeats;
            a.dups += s.dups;
            a.closed_by_server += s.closed_by_server;
            a.replay_gaps += s.replay_gaps;
            a.shutdowns += s.shutdowns;
            a.resumed += s.resumed;
            a.last_open_ns = a.last_open_ns.max(s.last_open_ns);
            for (k, v) in s.errors {
                *a.errors.entry(k).or_default() += v;
            }
        }
        Ok(t)
    }

    pub fn check(
        &mut self,
        published: &std::collections::BTreeMap<String, u64>,
    ) -> Result<Check, String> {
        let mut c = Check::default();
        for reply in self.all(Command::Check {
            published: published.clone(),
        })? {
            let Reply::Check(w) = reply else {
                return Err("expected check".into());
            };
            c.lost += w.lost;
            c.expected += w.expected;
            c.unique += w.unique;
            c.dups += w.dups;
        }
        Ok(c)
    }

    pub fn reset(&mut self) -> Result<(), String> {
        self.all(Command::Reset).map(|_| ())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let line = serde_json::to_string(&Command::Quit).unwrap_or_default();
            let _ = writeln!(w.stdin, "{line}");
            let _ = w.stdin.flush();
        }
        for w in &mut self.workers {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        proc::stop(w.child.id(), Duration::from_secs(1));
                        let _ = w.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

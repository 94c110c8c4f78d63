//! Processes through /proc and signals: a server's resident memory and CPU
//! time, the machine's description, and ending by PID (TERM, then KILL after a
//! grace period) the processes this harness started, never anything by name.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Resident set size of `pid` in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Proportional set size of `pid` in KiB (`Pss` of /proc/<pid>/smaps_rollup):
/// pages shared between processes (nginx's shared memory, the same binary
/// run N times) are split between them instead of counted in each.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of [`rss_kib`] over `pids` (missing processes count 0).
pub fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| rss_kib(p)).sum()
}

/// Sum of [`pss_kib`] over `pids`.
pub fn pss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| pss_kib(p)).sum()
}

/// Open descriptors of `pid` (entries of /proc/<pid>/fd).
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u64)
}

/// The live children of `pid` (nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = process_table()
        .into_iter()
        .filter(|(p, (ppid, _))| *ppid == pid && alive(*p))
        .map(|(p, _)| p)
        .collect();
    out.sort_unstable();
    out
}

/// utime + stime of `pid` in seconds (fields 14 and 15 of /proc/<pid>/stat).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 is state (index 0), so utime (14) is index 11, stime (15) index 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec())
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Whether `pid` is still running (and not a zombie we have yet to reap).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => text
            .rfind(')')
            .and_then(|i| text[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub fn stop(pid: u32, grace: Duration) {
    let Ok(p) = i32::try_from(pid) else { return };
    if p <= 1 {
        return;
    }
    // SAFETY: kill with a positive pid we spawned.
    unsafe { libc::kill(p, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// The child gets SIGKILL when this process dies, so nothing outlives a
/// crashed or interrupted harness. (Spawn from the main thread: the signal
/// follows the thread that forked.)
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// This very program, for re-executing itself as workers and floor server:
/// `/proc/self/exe` stays valid even when a build in the shared target
/// directory replaces the file during a run.
pub fn self_exe() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    sse_testkit::try_free_port().map_err(|e| format!("bind 127.0.0.1:0: {e}"))
}

/// nproc, CPU model and kernel, for the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub model: String,
    pub kernel: String,
    pub fd_limit: u64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        model,
        kernel,
        fd_limit: fd_limit(),
    }
}

/// The soft limit on open descriptors, after raising it to the hard limit.
pub fn fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit to fill and then pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    r.rlim_cur
}

/// CPU of a server (one process or several, summed) over an interval.
pub struct Sampler {
    pids: Vec<(u32, f64)>,
    at: Instant,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        Sampler::start_all(&[pid])
    }

    /// Samples the sum over `pids` (the N gateway processes, nginx's master
    /// and workers).
    pub fn start_all(pids: &[u32]) -> Sampler {
        Sampler {
            pids: pids
                .iter()
                .map(|&p| (p, cpu_secs(p).unwrap_or(0.0)))
                .collect(),
            at: Instant::now(),
        }
    }

    /// (CPU-seconds used, wall seconds elapsed) since start.
    pub fn read(&self) -> (f64, f64) {
        let cpu: f64 = self
            .pids
            .iter()
            .map(|&(p, cpu0)| (cpu_secs(p).unwrap_or(cpu0) - cpu0).max(0.0))
            .sum();
        (cpu, self.at.elapsed().as_secs_f64())
    }
}

/// Processes other than this one that used more than `min_pct` of a core
/// over `window`, busiest first: the background the numbers were taken on.
pub fn busy_processes(window: Duration, min_pct: f64) -> Vec<(String, f64)> {
    let snapshot = || -> Vec<(u32, String, f64)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_owned();
                Some((pid, name, cpu_secs(pid)?))
            })
            .collect()
    };
    let before = snapshot();
    std::thread::sleep(window);
    let me = std::process::id();
    let mut out: Vec<(String, f64)> = snapshot()
        .into_iter()
        .filter(|(pid, _, _)| *pid != me)
        .filter_map(|(pid, name, cpu)| {
            let (_, _, cpu0) = before.iter().find(|(p, _, _)| *p == pid)?;
            let pct = (cpu - cpu0) / window.as_secs_f64() * 100.0;
            (pct >= min_pct).then_some((format!("{name} ({pid})"), pct))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU used by processes that are neither this harness nor anything it
/// started (another session's build, a browser...), over an interval: the
/// noise a measurement was taken in.
pub struct Foreign {
    before: HashMap<u32, f64>,
    at: Instant,
    /// Processes measured in their own columns (a server started by hand
    /// and named with `--pid`): not counted again as foreign.
    measured: Vec<u32>,
}

/// pid -> (parent pid, CPU seconds) of every process.
fn process_table() -> HashMap<u32, (u32, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    let ticks = ticks_per_sec();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid: u32 = f.get(1)?.parse().ok()?;
            let cpu = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((pid, (ppid, cpu / ticks)))
        })
        .collect()
}

impl Foreign {
    /// Starts counting every process but this run's and `measured`.
    pub fn start(measured: &[u32]) -> Foreign {
        Foreign {
            before: process_table()
                .into_iter()
                .map(|(p, (_, c))| (p, c))
                .collect(),
            at: Instant::now(),
            measured: measured.to_vec(),
        }
    }

    /// Percent of one core used by foreign processes since `start`.
    pub fn pct(&self) -> f64 {
        let table = process_table();
        let me = std::process::id();
        let ours = |mut pid: u32| {
            // Walk up at most 64 parents: ours if we meet this process.
            for _ in 0..64 {
                if pid == me {
                    return true;
                }
                match table.get(&pid) {
                    Some((ppid, _)) if *ppid > 1 => pid = *ppid,
                    _ => return false,
                }
            }
            false
        };
        let used: f64 = table
            .iter()
            .filter(|(pid, _)| !ours(**pid) && !self.measured.contains(pid))
            .map(|(pid, (_, cpu))| (cpu - self.before.get(pid).copied().unwrap_or(*cpu)).max(0.0))
            .sum();
        used / self.at.elapsed().as_secs_f64().max(1e-9) * 100.0
    }
}

/// The lines a child writes on `out`, read by a thread and handed over a
/// channel, so the caller can wait for them with a timeout.
pub fn lines(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_secs(me).is_some());
        assert!(alive(me));
        let m = machine();
        assert!(m.nproc >= 1 && !m.kernel.is_empty());
        assert!(free_port().unwrap() > 0);
    }

    /// A busy process that is not this run's descendant (its parent exits,
    /// so it is reparented), as a server started by hand is: foreign CPU
    /// unless it is named as measured.
    #[test]
    fn a_measured_process_is_not_counted_as_foreign() {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                // Bounded: a few seconds of counting if the kill below never came.
                "sh -c 'i=0; while [ $i -lt 20000000 ]; do i=$((i+1)); done' >/dev/null 2>&1 & echo $!",
            ])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let all = Foreign::start(&[]);
        let measured = Foreign::start(&[pid]);
        std::thread::sleep(Duration::from_millis(500));
        let (all, measured) = (all.pct(), measured.pct());
        // SAFETY: kill only signals the process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert!(
            all - measured > 20.0,
            "all {all:.1} %, measured left out {measured:.1} %"
        );
    }
}

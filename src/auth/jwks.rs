//! JWKS documents kept fresh off the reactors. A [`JwksFeed`] holds the
//! current [`KeySet`] behind a lock that reactors only ever read (cloning an
//! `Arc`); one background thread per feed replaces it:
//!
//! - `--jwks-file`: the file is checked every [`FILE_POLL`] and re-read when
//!   its size, mtime or inode changes;
//! - `--jwks-url`: fetched every `--jwks-refresh-secs`, and at once when a
//!   token names an unknown `kid` (a non-blocking nudge; nudged fetches at
//!   most every [`NUDGE_EVERY`], so random `kid`s cannot hammer the identity
//!   provider).
//!
//! A document that cannot be read, fetched or parsed, or has no usable key,
//! never replaces the last good set: known keys keep working while the
//! identity provider is down.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use super::keys::{parse_jwks, KeySet, MAX_DOCUMENT_BYTES};

/// How often `--jwks-file` is checked for a change.
pub const FILE_POLL: Duration = Duration::from_millis(500);

/// Shortest time between two fetches caused by unknown `kid`s.
pub const NUDGE_EVERY: Duration = Duration::from_secs(10);

/// Longest a JWKS fetch may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait before a failed fetch is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// One JWKS source and its current key set.
pub struct JwksFeed {
    /// The flag and its value, for the log.
    origin: String,
    current: RwLock<Arc<KeySet>>,
    /// Documents read or fetched so far, good or not.
    offers: AtomicU64,
    /// `--jwks-url`: wakes the fetch thread when a token names an unknown kid.
    nudge: Option<Sender<()>>,
}

impl JwksFeed {
    fn new(origin: String, nudge: Option<Sender<()>>) -> JwksFeed {
        JwksFeed {
            origin,
            current: RwLock::new(Arc::new(KeySet::default())),
            offers: AtomicU64::new(0),
            nudge,
        }
    }

    /// A feed that never changes: `doc` parsed now (tests).
    #[cfg(test)]
    pub fn fixed(doc: &[u8]) -> Arc<JwksFeed> {
        let feed = JwksFeed::new("fixed".into(), None);
        assert!(feed.offer(Ok(doc.to_vec())));
        Arc::new(feed)
    }

    /// The current key set; never blocks on I/O.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A token named a `kid` this feed does not know: ask for a fetch (URL
    /// feeds only). Returns at once; this request still fails.
    pub fn unknown_kid(&self) {
        if let Some(nudge) = &self.nudge {
            let _ = nudge.try_send(());
        }
    }

    /// How many documents were read or fetched so far, good or not.
    pub fn offers(&self) -> u64 {
        self.offers.load(Ordering::Acquire)
    }

    /// Takes `doc` as the new set, or keeps the last good one.
    fn offer(&self, doc: Result<Vec<u8>, String>) -> bool {
        let _counted = Counted(&self.offers);
        match doc.and_then(|d| parse_jwks(&d)) {
            Ok((set, skipped)) => {
                for why in skipped {
                    warn!("{}: {why}", self.origin);
                }
                info!("{}: {} keys ({})", self.origin, set.len(), set.describe());
                let set = Arc::new(set);
                match self.current.write() {
                    Ok(mut cur) => *cur = set,
                    Err(poisoned) => *poisoned.into_inner() = set,
                }
                true
            }
            Err(e) => {
                let kept = self.keys().len();
                warn!(
                    "{}: {e}; keeping the last good set ({kept} keys)",
                    self.origin
                );
                false
            }
        }
    }
}

/// Counts an offer once it is done (taken or refused).
struct Counted<'a>(&'a AtomicU64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Reads `--jwks-file` now (an unreadable or unusable file is an error:
/// exit 2) and re-reads it whenever it changes.
pub fn watch_file(path: &Path, poll: Duration) -> Result<Arc<JwksFeed>, String> {
    let feed = Arc::new(JwksFeed::new(
        format!("--jwks-file {}", path.display()),
        None,
    ));
    let mut seen = file_signature(path);
    let first = read_bounded(path).and_then(|d| parse_jwks(&d).map(|_| d))?;
    feed.offer(Ok(first));
    let weak = Arc::downgrade(&feed);
    let path = path.to_path_buf();
    thread::Builder::new()
        .name("jwks-file".into())
        .spawn(move || loop {
            thread::sleep(poll);
            let Some(feed) = weak.upgrade() else { return };
            let now = file_signature(&path);
            if now != seen {
                // Noted before reading: a write during the read changes it
                // again and is picked up on the next round.
                seen = now;
                feed.offer(read_bounded(&path));
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(feed)
}

/// What tells that a file changed: size, mtime, inode (a rename over it).
fn file_signature(path: &Path) -> Option<(u64, SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// A file's content, at most [`MAX_DOCUMENT_BYTES`].
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut doc = Vec::new();
    file.take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut doc)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if doc.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "{} is over {MAX_DOCUMENT_BYTES} bytes",
            path.display()
        ));
    }
    Ok(doc)
}

/// Fetches `--jwks-url` now (a failure only warns: the identity provider
/// may be down while the gateway starts) and then every `refresh`, or
/// sooner when nudged (at most every `nudge_every`).
pub fn follow_url(
    url: &str,
    refresh: Duration,
    nudge_every: Duration,
) -> Result<Arc<JwksFeed>, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .max_redirects(3)
        .user_agent(concat!("sse-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let feed = Arc::new(JwksFeed::new(format!("--jwks-url {url}"), Some(tx)));
    let fetcher = Fetcher {
        agent,
        url: url.to_owned(),
        refresh,
        nudge_every,
    };
    let ok = feed.offer(fetcher.fetch());
    let weak = Arc::downgrade(&feed);
    thread::Builder::new()
        .name("jwks-url".into())
        .spawn(move || fetcher.run(&weak, &rx, ok))
        .map_err(|e| e.to_string())?;
    Ok(feed)
}

struct Fetcher {
    agent: ureq::Agent,
    url: String,
    refresh: Duration,
    nudge_every: Duration,
}

impl Fetcher {
    fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .agent
            .get(&self.url)
            .header("Accept", "application/json")
            .call()
            .map_err(|e| format!("fetch failed: {e}"))?;
        response
            .body_mut()
            .with_config()
            .limit(MAX_DOCUMENT_BYTES)
            .read_to_vec()
            .map_err(|e| format!("fetch failed: {e}"))
    }

    fn next_after(&self, ok: bool) -> Instant {
        let wait = if ok {
            self.refresh
        } else {
            self.refresh.min(RETRY_AFTER_FAILURE)
        };
        Instant::now() + wait
    }

    /// The fetch loop; ends when the feed is dropped.
    fn run(self, feed: &Weak<JwksFeed>, nudges: &Receiver<()>, first_ok: bool) {
        let mut next = self.next_after(first_ok);
        let mut last_nudged: Option<Instant> = None;
        let mut nudged = false;
        loop {
            match nudges.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Disconnected) => return,
                Ok(()) => {
                    let earliest = last_nudged.map_or_else(Instant::now, |t| t + self.nudge_every);
                    if earliest < next {
                        next = earliest;
                        nudged = true;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() < next {
                continue;
            }
            if std::mem::take(&mut nudged) {
                last_nudged = Some(Instant::now());
            }
            let Some(feed) = feed.upgrade() else { return };
            let ok = feed.offer(self.fetch());
            next = self.next_after(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// A JWKS document of one Ed25519 key named `kid`.
    fn doc(kid: &str) -> String {
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]})
        .to_string()
    }

    /// Serves `body` to every request on a loopback port; records when each
    /// request came.
    fn serve(body: Arc<Mutex<String>>, hits: Arc<Mutex<Vec<Instant>>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                hits.lock().unwrap().push(Instant::now());
                let body = body.lock().unwrap().clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn unknown_kids_fetch_at_once_but_at_most_every_nudge_period() {
        let body = Arc::new(Mutex::new(doc("k1")));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let url = serve(body.clone(), hits.clone());
        let every = Duration::from_millis(400);
        let feed = follow_url(&url, Duration::from_secs(300), every).unwrap();
        assert_eq!(hits.lock().unwrap().len(), 1, "fetched once at start");
        assert!(feed.keys().find("k1").is_some());

        *body.lock().unwrap() = doc("k2");
        feed.unknown_kid();
        wait_for("the nudged fetch", || feed.keys().find("k2").is_some());
        // A burst of unknown kids: one more fetch, `every` after the
        // previous nudged one.
        for _ in 0..20 {
            feed.unknown_kid();
        }
        wait_for("the deferred fetch", || hits.lock().unwrap().len() == 3);
        let hits = hits.lock().unwrap().clone();
        // (Measured where the server sees them: less the first fetch's own
        // latency.)
        let gap = hits[2] - hits[1];
        assert!(gap >= every - Duration::from_millis(100), "{gap:?}");

        // A broken document keeps the last good set.
        *body.lock().unwrap() = "{\"keys\": []}".into();
        feed.unknown_kid();
        wait_for("the broken document", || feed.offers() == 4);
        assert!(feed.keys().find("k2").is_some());
    }

    #[test]
    fn urls_must_be_http() {
        for bad in ["file:///etc/passwd", "ftp://x/jwks", "jwks.json"] {
            assert!(
                follow_url(bad, Duration::from_secs(1), NUDGE_EVERY).is_err(),
                "{bad}"
            );
        }
    }
}

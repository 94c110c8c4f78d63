//! Revocations that reach open streams: a revoked ticket ends every stream
//! opened with it; an access change ends data streams naming a device the
//! user no longer owns and narrows alert streams. Revocations of the last
//! few seconds are remembered ([`Recent`]), so one that overtook a stream
//! still opening reaches it too.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::conn::Phase;
use super::{Cause, Reactor, LINGER};
use crate::auth::UserId;
use crate::stream::frame::{Frame, Purpose};
use crate::stream::subscriptions::Filter;
use crate::stream::Stream;

/// How long a revocation is remembered for streams still opening.
const RECENT_MS: u64 = 10_000;
/// Revocations remembered at most.
const RECENT_MAX: usize = 1024;

/// A revocation, as streams still opening must check it.
enum Revocation {
    Ticket(uuid::Uuid),
    Access(UserId, Arc<HashSet<Box<str>>>),
}

/// Revocations of the last [`RECENT_MS`], newest last.
#[derive(Default)]
pub(super) struct Recent(VecDeque<(u64, Revocation)>);

impl Recent {
    fn push(&mut self, now: u64, r: Revocation) {
        while self
            .0
            .front()
            .is_some_and(|(at, _)| at + RECENT_MS < now || self.0.len() >= RECENT_MAX)
        {
            self.0.pop_front();
        }
        self.0.push_back((now, r));
    }

    /// Whether a revocation since `since` (the stream's request) refuses
    /// `stream`, about to open; an access change narrows an alert stream's
    /// filter instead.
    pub(super) fn refuses(&self, since: u64, stream: &mut Stream) -> bool {
        for (_, r) in self.0.iter().filter(|(at, _)| *at >= since) {
            match r {
                Revocation::Ticket(t) if *t == stream.ticket => return true,
                Revocation::Access(user, owned) if user.key == stream.user && !stream.admin => {
                    match &stream.filter {
                        Filter::Devices(d) if stream.purpose == Purpose::Data => {
                            if d.iter().any(|d| !owned.contains(d)) {
                                return true;
                            }
                        }
                        _ => stream.filter = Filter::Devices(owned.iter().cloned().collect()),
                    }
                }
                _ => {}
            }
        }
        false
    }
}

fn revoked_frame() -> Arc<Frame> {
    Frame::system(r#"{"kind":"revoked"}"#)
}

impl Reactor {
    /// Says `revoked` to a stream and closes it once that is written (or
    /// after a short linger if the client does not take it).
    pub(super) fn end_revoked(&mut self, key: usize) {
        self.gw.metrics.revoked.fetch_add(1, Relaxed);
        if !self.push_frame(key, &revoked_frame()) {
            return;
        }
        self.end_stream(key, Cause::Revoked);
        self.arm(key, LINGER);
        self.mark_dirty(key);
    }

    /// Ticket `ticket` was revoked: every stream opened with it ends.
    pub(super) fn revoke(&mut self, ticket: uuid::Uuid) {
        self.recent.push(self.now(), Revocation::Ticket(ticket));
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stream().is_some_and(|s| s.ticket == ticket))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.end_revoked(key);
        }
    }

    /// `user` owns exactly `owned` now: data streams naming anything else
    /// end; alert streams follow the new set.
    pub(super) fn access_changed(&mut self, user: &UserId, owned: Arc<HashSet<Box<str>>>) {
        self.recent
            .push(self.now(), Revocation::Access(user.clone(), owned.clone()));
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stream().is_some_and(|s| s.user == user.key && !s.admin))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let waiting = self.is_waiting(key);
            let Some(Phase::Streaming(s)) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
                continue;
            };
            match (&s.filter, s.purpose) {
                (Filter::Devices(d), Purpose::Data) => {
                    if d.iter().any(|d| !owned.contains(d)) {
                        self.end_revoked(key);
                    }
                }
                (old, _) => {
                    let new = Filter::Devices(owned.iter().cloned().collect());
                    // A stream still waiting for its resume id is put into
                    // the index later, with the filter it has then.
                    if !waiting {
                        self.subs.remove(key, s.purpose, old);
                        self.subs.add(key, s.purpose, &new);
                    }
                    s.filter = new;
                }
            }
        }
    }
}

//! How other threads talk to a reactor: an unbounded channel plus a
//! `mio::Waker`. The Redis subscriber, the store workers, the signal thread and
//! the other reactors send here; the reactor drains it on every loop turn.
//!
//! Waking costs a syscall (an eventfd write), so a sender wakes the reactor
//! only when the reactor said it is about to sleep (`armed`): under load,
//! thousands of frames a second cost no wake-ups at all.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::bus::store::{Outcome, Reply};
use crate::stream::frame::Frame;

/// What a reactor can be told.
pub enum Inbox {
    /// An event from the bus, routed by its device.
    Frame(Arc<Frame>),
    /// A `system` frame for every stream (degraded, recovered).
    System(Arc<Frame>),
    /// A store lookup for connection `conn` came back.
    Outcome {
        conn: usize,
        serial: u64,
        outcome: Outcome,
    },
    /// Another reactor's stream request was refused by a limit this
    /// connection holds: look whether its client has gone, then answer with
    /// `Probed` to `asker`.
    Probe { conn: usize, asker: Reply },
    /// A probe this connection asked for is done.
    Probed { conn: usize, serial: u64 },
    /// SIGTERM/SIGINT: stop accepting, say goodbye to every stream, exit.
    Drain,
}

pub struct Mailbox {
    tx: Sender<Inbox>,
    waker: mio::Waker,
    armed: AtomicBool,
}

impl Mailbox {
    pub fn new(waker: mio::Waker) -> (Mailbox, Receiver<Inbox>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mailbox = Mailbox {
            tx,
            waker,
            armed: AtomicBool::new(false),
        };
        (mailbox, rx)
    }

    pub fn send(&self, msg: Inbox) {
        if self.tx.send(msg).is_ok() && self.armed.swap(false, SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// The reactor is about to block in `poll`: the next send must wake it.
    /// Returns false when something arrived meanwhile (do not block).
    pub fn arm(&self, rx: &Receiver<Inbox>) -> bool {
        self.armed.store(true, SeqCst);
        if rx.is_empty() {
            true
        } else {
            self.armed.store(false, SeqCst);
            false
        }
    }

    pub fn disarm(&self) {
        self.armed.store(false, SeqCst);
    }

    /// Messages waiting to be drained (the `/metrics` mailbox depth gauge).
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

/// Every reactor's mailbox, indexed by reactor number.
pub type Mailboxes = Arc<[Mailbox]>;

//! How other threads talk to a reactor: two channels plus a `mio::Waker`.
//!
//! - Bus frames go through a **bounded** channel: a reactor that falls behind
//!   a flood of events must not grow without bound. A frame that finds the
//!   channel full is dropped here, and the reactor notices the hole in the
//!   sequence numbers of the frames that do arrive: it fills it from the
//!   replay window, or tells its streams `replay-gap` when the window no
//!   longer holds it. Never a silent loss.
//! - Everything else (store outcomes, probes, system frames, revocations,
//!   drain) goes through an unbounded channel: those messages are bounded by
//!   the requests in flight and the connections open, and none may be lost.
//!
//! Waking costs a syscall (an eventfd write), so a sender wakes the reactor
//! only when the reactor said it is about to sleep (`armed`): under load,
//! thousands of frames a second cost no wake-ups at all.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::auth::UserId;
use crate::store::protocol::{Outcome, Reply};
use crate::stream::frame::Frame;

/// What a reactor can be told, besides bus frames.
pub enum Inbox {
    /// A `system` frame for every stream (degraded, recovered).
    System(Arc<Frame>),
    /// A store lookup for connection `conn` came back.
    Outcome {
        conn: usize,
        serial: u32,
        outcome: Outcome,
    },
    /// Another reactor's stream request was refused by a limit this
    /// connection holds: look whether its client has gone, then answer with
    /// `Probed` to `asker`.
    Probe { conn: usize, asker: Reply },
    /// A probe this connection asked for is done; `freed`: the probed
    /// stream's client had gone, and its slot is free.
    Probed {
        conn: usize,
        serial: u32,
        freed: bool,
    },
    /// Ticket `id` was revoked: close every stream opened with it.
    Revoke { ticket: uuid::Uuid },
    /// `user` now owns exactly `owned`: close their data streams naming
    /// anything else, narrow (or widen) their alert streams.
    Access {
        user: UserId,
        owned: Arc<HashSet<Box<str>>>,
    },
    /// SIGTERM/SIGINT: stop accepting, say goodbye to every stream, exit.
    Drain,
}

pub struct Mailbox {
    frames: Sender<Arc<Frame>>,
    /// A frame was refused since the reactor last looked: it must recover
    /// up to the hub's newest frame even if no later frame ever arrives.
    overflowed: AtomicBool,
    control: Sender<Inbox>,
    waker: mio::Waker,
    armed: AtomicBool,
}

/// The reactor's ends of its mailbox.
pub struct Inboxes {
    pub frames: Receiver<Arc<Frame>>,
    pub control: Receiver<Inbox>,
}

impl Inboxes {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.control.is_empty()
    }
}

impl Mailbox {
    /// A mailbox holding at most `frame_bound` frames.
    pub fn new(waker: mio::Waker, frame_bound: usize) -> (Mailbox, Inboxes) {
        let (frames, frames_rx) = crossbeam_channel::bounded(frame_bound.max(1));
        let (control, control_rx) = crossbeam_channel::unbounded();
        let mailbox = Mailbox {
            frames,
            overflowed: AtomicBool::new(false),
            control,
            waker,
            armed: AtomicBool::new(false),
        };
        let inboxes = Inboxes {
            frames: frames_rx,
            control: control_rx,
        };
        (mailbox, inboxes)
    }

    /// Queues a bus frame; false when the reactor is that far behind and the
    /// frame was dropped (the reactor recovers it by its sequence number).
    pub fn send_frame(&self, frame: Arc<Frame>) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => {
                self.wake();
                true
            }
            Err(TrySendError::Full(_)) => {
                self.overflowed.store(true, SeqCst);
                self.wake();
                false
            }
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    pub fn send(&self, msg: Inbox) {
        if self.control.send(msg).is_ok() {
            self.wake();
        }
    }

    fn wake(&self) {
        if self.armed.swap(false, SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// Whether a frame was refused since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, SeqCst)
    }

    /// Messages waiting, for `/metrics`.
    pub fn depth(&self) -> usize {
        self.frames.len() + self.control.len()
    }

    /// The reactor is about to block in `poll`: the next send must wake it.
    /// Returns false when something arrived meanwhile (do not block).
    pub fn arm(&self, rx: &Inboxes) -> bool {
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
}

/// Every reactor's mailbox, indexed by reactor number.
pub type Mailboxes = Arc<[Mailbox]>;

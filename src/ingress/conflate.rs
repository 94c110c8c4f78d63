//! Per-device rate limit for `realtime-update` (`--max-rate-per-device`):
//! at most R events a second per device; above it the newest value wins.
//!
//! Decided once per event at the bus, before any frame exists, so its cost
//! does not grow with the number of subscribers. A device's first event in a
//! quiet period goes out at once; events that come faster replace each other
//! in one pending slot, which a small thread emits when the device's next
//! slot opens. Nothing is queued beyond one message per device.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::stream::frame::Message;
use crate::time::epoch_ms;

/// Devices tracked at once. Past it the quiet ones are forgotten (the slot
/// of a device quiet for an interval holds nothing back), and a new device
/// that still finds no room is not limited.
const MAX_DEVICES: usize = 65_536;

struct Slot {
    /// When this device may send again (epoch ms).
    next_free: u64,
    /// The newest held message, if any.
    pending: Option<Message>,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, Slot>,
    /// (due time, device) of every slot with a pending message.
    due: BinaryHeap<Reverse<(u64, String)>>,
    /// No sweep of the full map before this time: one that freed nothing
    /// cannot free anything sooner than an interval later.
    next_sweep: u64,
}

pub struct Conflator {
    interval_ms: u64,
    state: Mutex<State>,
    wake: Condvar,
}

/// What became of an offered message.
pub enum Offer {
    /// Send it now.
    Send(Message),
    /// Held; it (or a newer value) goes out when the device's slot opens.
    /// `replaced`: an older held value was dropped for it.
    Held { replaced: bool },
}

impl Conflator {
    /// A limit of `per_second` events a second per device.
    pub fn new(per_second: f64) -> Conflator {
        Conflator {
            interval_ms: (1000.0 / per_second).ceil().max(1.0) as u64,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn offer(&self, msg: Message, now: u64) -> Offer {
        let mut s = self.lock();
        let interval = self.interval_ms;
        if s.devices.len() >= MAX_DEVICES && !s.devices.contains_key(&msg.device) {
            // Device ids come from Redis: the map must not grow with them.
            // Forget the slots that hold nothing back any more; when every
            // slot is still busy, this device goes unlimited for now.
            if now >= s.next_sweep {
                s.devices
                    .retain(|_, slot| slot.pending.is_some() || slot.next_free > now);
                s.next_sweep = now + interval;
            }
            if s.devices.len() >= MAX_DEVICES {
                return Offer::Send(msg);
            }
        }
        let slot = s.devices.entry(msg.device.clone()).or_insert(Slot {
            next_free: 0,
            pending: None,
        });
        if slot.pending.is_none() && now >= slot.next_free {
            slot.next_free = now + interval;
            return Offer::Send(msg);
        }
        let due = slot.next_free;
        let device = msg.device.clone();
        let replaced = slot.pending.replace(msg).is_some();
        if !replaced {
            s.due.push(Reverse((due, device)));
            self.wake.notify_one();
        }
        Offer::Held { replaced }
    }

    /// The held messages due by `now`, each device's slot moved on.
    fn take_due(&self, s: &mut State, now: u64) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = s.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, device))) = s.due.pop() else {
                break;
            };
            if let Some(slot) = s.devices.get_mut(&device) {
                if let Some(msg) = slot.pending.take() {
                    slot.next_free = now + self.interval_ms;
                    out.push(msg);
                }
            }
        }
        out
    }

    /// The emitting thread's body: forever hands due messages to `emit`.
    pub fn run(&self, emit: impl Fn(Message)) {
        loop {
            let ready = {
                let mut s = self.lock();
                loop {
                    let now = epoch_ms();
                    let ready = self.take_due(&mut s, now);
                    if !ready.is_empty() {
                        break ready;
                    }
                    let wait = match s.due.peek() {
                        Some(Reverse((at, _))) => {
                            Duration::from_millis(at.saturating_sub(now).max(1))
                        }
                        None => Duration::from_secs(60),
                    };
                    s = self
                        .wake
                        .wait_timeout(s, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            };
            for msg in ready {
                emit(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::frame::Event;

    fn msg(device: &str, n: u32) -> Message {
        Message {
            event: Event::RealtimeUpdate,
            device: device.into(),
            data: n.to_string().into_bytes(),
        }
    }

    fn sent(o: Offer) -> Option<String> {
        match o {
            Offer::Send(m) => Some(String::from_utf8(m.data).unwrap()),
            Offer::Held { .. } => None,
        }
    }

    #[test]
    fn newest_value_wins_within_a_slot() {
        let c = Conflator::new(10.0); // one per 100 ms
        assert_eq!(sent(c.offer(msg("A", 1), 1_000)), Some("1".into()));
        assert_eq!(
            sent(c.offer(msg("B", 1), 1_000)),
            Some("1".into()),
            "devices are independent"
        );
        for n in 2..=5 {
            assert_eq!(sent(c.offer(msg("A", n), 1_010 + n as u64)), None);
        }
        let mut s = c.lock();
        assert!(c.take_due(&mut s, 1_099).is_empty(), "never early");
        let due = c.take_due(&mut s, 1_100);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].data, b"5");
        assert!(c.take_due(&mut s, 5_000).is_empty(), "nothing twice");
        drop(s);
        // Right after an emitted slot the device is limited again.
        assert_eq!(sent(c.offer(msg("A", 6), 1_150)), None);
        assert_eq!(
            sent(c.offer(msg("A", 7), 1_300)),
            None,
            "a pending value holds later ones back"
        );
        let mut s = c.lock();
        let due = c.take_due(&mut s, 1_300);
        assert_eq!(due[0].data, b"7");
    }

    #[test]
    fn the_device_map_stays_bounded_under_one_off_device_ids() {
        let c = Conflator::new(1.0); // one per second
        let mut now = 0;
        for n in 0..(MAX_DEVICES as u64 * 3) {
            now = n / 1000; // a thousand new devices per millisecond
            let _ = c.offer(msg(&format!("d{n}"), 1), now);
            assert!(c.lock().devices.len() <= MAX_DEVICES);
        }
        // Once the slots have aged an interval, room comes back.
        let _ = c.offer(msg("late", 1), now + 1_001);
        assert!(c.lock().devices.len() < MAX_DEVICES);
        assert!(c.lock().devices.contains_key("late"));
    }

    #[test]
    fn a_quiet_device_sends_at_once() {
        let c = Conflator::new(2.0);
        assert!(sent(c.offer(msg("A", 1), 0)).is_some());
        assert!(sent(c.offer(msg("A", 2), 500)).is_some());
        assert!(sent(c.offer(msg("A", 3), 999)).is_none());
    }
}

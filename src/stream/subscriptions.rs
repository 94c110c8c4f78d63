//! A reactor's index from device to the streams that want it, so routing a
//! frame costs one hash lookup plus its subscribers, not a scan of every
//! stream. Data and alert streams are indexed apart since the same device's
//! events go to one kind or the other.
//!
//! Each device's subscribers are a short `Vec` of 32-bit connection keys
//! (most devices have a few), or, past [`FEW`], an insertion-ordered set:
//! fan-out walks a dense array either way, and on a hot device a stream
//! leaves in O(1) (a swap with the last), so a reconnect storm there is not
//! quadratic.

use crate::stream::registry::Devices;
use std::collections::HashMap;

use indexmap::IndexSet;

/// Subscribers a device keeps in a plain `Vec`: removal scans at most 512
/// bytes, still cheaper than hashing, and the set costs about 8 times the
/// memory (an index table, and a hash beside every key).
const FEW: usize = 128;

/// The streams subscribed to one device, by connection key (keys index a
/// slab of descriptors: 32 bits hold them).
enum Subscribers {
    Few(Vec<u32>),
    Many(IndexSet<u32>),
}

impl Subscribers {
    fn one(stream: u32) -> Subscribers {
        Subscribers::Few(vec![stream])
    }

    fn insert(&mut self, stream: u32) {
        match self {
            Subscribers::Few(v) if v.contains(&stream) => {}
            Subscribers::Few(v) if v.len() < FEW => v.push(stream),
            Subscribers::Few(v) => {
                let mut set: IndexSet<u32> = v.drain(..).collect();
                set.insert(stream);
                *self = Subscribers::Many(set);
            }
            Subscribers::Many(set) => {
                set.insert(stream);
            }
        }
    }

    fn remove(&mut self, stream: u32) {
        match self {
            Subscribers::Few(v) => {
                if let Some(i) = v.iter().position(|s| *s == stream) {
                    v.swap_remove(i);
                }
            }
            Subscribers::Many(set) => {
                set.swap_remove(&stream);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Subscribers::Few(v) => v.is_empty(),
            Subscribers::Many(set) => set.is_empty(),
        }
    }

    fn each(&self, f: &mut impl FnMut(usize)) {
        match self {
            Subscribers::Few(v) => v.iter().for_each(|&s| f(s as usize)),
            Subscribers::Many(set) => set.iter().for_each(|&s| f(s as usize)),
        }
    }
}

use crate::stream::frame::{Event, Frame, Purpose};

/// Which events a stream receives.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Events of these devices.
    Devices(Devices),
    /// Every device (an admin's alerts stream).
    All,
}

#[derive(Default)]
pub struct Subscriptions {
    data: HashMap<Box<str>, Subscribers>,
    alerts: HashMap<Box<str>, Subscribers>,
    /// Alert streams that receive every device (admins).
    alerts_all: IndexSet<usize>,
}

impl Subscriptions {
    fn table(&mut self, purpose: Purpose) -> &mut HashMap<Box<str>, Subscribers> {
        match purpose {
            Purpose::Data => &mut self.data,
            Purpose::Alerts => &mut self.alerts,
        }
    }

    pub fn add(&mut self, stream: usize, purpose: Purpose, filter: &Filter) {
        match filter {
            Filter::All => {
                self.alerts_all.insert(stream);
            }
            Filter::Devices(devices) => {
                let key = stream as u32;
                let table = self.table(purpose);
                for d in devices.iter() {
                    // Look up before inserting: the key is cloned only for a
                    // device nobody here watched yet.
                    match table.get_mut(&**d) {
                        Some(set) => {
                            set.insert(key);
                        }
                        None => {
                            table.insert(d.clone(), Subscribers::one(key));
                        }
                    }
                }
            }
        }
    }

    pub fn remove(&mut self, stream: usize, purpose: Purpose, filter: &Filter) {
        match filter {
            Filter::All => {
                self.alerts_all.swap_remove(&stream);
            }
            Filter::Devices(devices) => {
                let table = self.table(purpose);
                for d in devices.iter() {
                    if let Some(list) = table.get_mut(&**d) {
                        list.remove(stream as u32);
                        if list.is_empty() {
                            table.remove(&**d);
                        }
                    }
                }
            }
        }
    }

    /// Calls `f` with every stream that receives `frame`.
    pub fn each(&self, frame: &Frame, mut f: impl FnMut(usize)) {
        match frame.event.purpose() {
            Some(Purpose::Data) => {
                if let Some(subs) = self.data.get(&frame.device) {
                    subs.each(&mut f);
                }
            }
            Some(Purpose::Alerts) => {
                if let Some(subs) = self.alerts.get(&frame.device) {
                    subs.each(&mut f);
                }
                self.alerts_all.iter().for_each(|s| f(*s));
            }
            None => {}
        }
    }
}

/// Whether a stream of `purpose` with `filter` receives `frame` (for replay).
pub fn wants(purpose: Purpose, filter: &Filter, frame: &Frame) -> bool {
    // A gap marker in the sequence is every stream's business.
    if frame.event == Event::System {
        return true;
    }
    frame.event.purpose() == Some(purpose)
        && match filter {
            Filter::All => true,
            Filter::Devices(d) => d.iter().any(|d| **d == *frame.device),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::frame::Event;

    fn frame(event: Event, device: &str) -> Frame {
        Frame::encode(None, event, device, b"{}")
    }

    fn who(s: &Subscriptions, f: &Frame) -> Vec<usize> {
        let mut v = vec![];
        s.each(f, |k| v.push(k));
        v.sort();
        v
    }

    #[test]
    fn frames_reach_exactly_their_subscribers() {
        let mut s = Subscriptions::default();
        let devices = |d: &[&str]| Filter::Devices(d.iter().map(|x| (*x).into()).collect());
        s.add(1, Purpose::Data, &devices(&["A", "B"]));
        s.add(2, Purpose::Data, &devices(&["B"]));
        s.add(3, Purpose::Alerts, &devices(&["A"]));
        s.add(4, Purpose::Alerts, &Filter::All);
        assert_eq!(who(&s, &frame(Event::RealtimeUpdate, "A")), vec![1]);
        assert_eq!(who(&s, &frame(Event::SpcSeriesUpdate, "B")), vec![1, 2]);
        assert_eq!(who(&s, &frame(Event::MachineAlert, "A")), vec![3, 4]);
        assert_eq!(who(&s, &frame(Event::AlarmUpdate, "Z")), vec![4]);
        assert_eq!(
            who(&s, &frame(Event::RealtimeUpdate, "Z")),
            Vec::<usize>::new()
        );
        assert!(wants(
            Purpose::Data,
            &devices(&["A"]),
            &frame(Event::SpcUpdate, "A")
        ));
        assert!(!wants(
            Purpose::Data,
            &devices(&["A"]),
            &frame(Event::MachineAlert, "A")
        ));
        s.remove(1, Purpose::Data, &devices(&["A", "B"]));
        s.remove(4, Purpose::Alerts, &Filter::All);
        assert_eq!(who(&s, &frame(Event::SpcSeriesUpdate, "B")), vec![2]);
        assert_eq!(
            who(&s, &frame(Event::AlarmUpdate, "Z")),
            Vec::<usize>::new()
        );
        assert!(!s.data.contains_key("A"), "empty lists are dropped");
    }

    /// The naive model: every open stream with its filter, scanned.
    fn naive(open: &[(usize, Purpose, Filter)], f: &Frame) -> Vec<usize> {
        let mut v: Vec<usize> = open
            .iter()
            .filter(|(_, p, filter)| wants(*p, filter, f))
            .map(|(k, _, _)| *k)
            .collect();
        v.sort();
        v
    }

    /// A hot device, its list growing past [`FEW`] into a set and back
    /// down: routing matches the naive model through opens and closes in
    /// any order (the property below stays under `FEW`).
    #[test]
    fn a_hot_device_routes_like_the_naive_model_past_few() {
        let mut s = Subscriptions::default();
        let mut open: Vec<(usize, Purpose, Filter)> = Vec::new();
        let hot = || Filter::Devices(Devices::from(vec!["H".into()]));
        let f = frame(Event::RealtimeUpdate, "H");
        let (mut seed, mut grew) = (0x2545_f491_4f6c_dd1d_u64, false);
        for step in 0..4000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Mostly opens in the first half, mostly closes in the second.
            let opening = (seed % 4 != 0) == (step < 2000);
            let key = (seed >> 8) as usize % 400;
            match open.iter().position(|(k, _, _)| *k == key) {
                Some(i) if !opening => {
                    let (k, p, filter) = open.swap_remove(i);
                    s.remove(k, p, &filter);
                }
                None if opening => {
                    s.add(key, Purpose::Data, &hot());
                    open.push((key, Purpose::Data, hot()));
                }
                _ => continue,
            }
            grew |= matches!(s.data.get("H"), Some(Subscribers::Many(_)));
            if step % 7 == 0 {
                assert_eq!(who(&s, &f), naive(&open, &f), "step {step}");
            }
        }
        assert!(grew, "the list became a set");
        assert_eq!(who(&s, &f), naive(&open, &f));
    }

    proptest::proptest! {
        /// Any sequence of opens and closes routes every frame exactly as
        /// scanning every stream would.
        #[test]
        fn matches_the_naive_model(ops in proptest::collection::vec((0..90usize, 0..3usize, 0..8u8, proptest::bool::ANY), 1..300)) {
            let mut s = Subscriptions::default();
            let mut open: Vec<(usize, Purpose, Filter)> = Vec::new();
            let device = |n: u8| format!("D{}", n % 5);
            for (key, kind, dev, close) in ops {
                if let Some(i) = open.iter().position(|(k, _, _)| *k == key) {
                    if close {
                        let (k, p, f) = open.swap_remove(i);
                        s.remove(k, p, &f);
                    }
                    continue;
                }
                let (purpose, filter) = match kind {
                    0 => (Purpose::Data, Filter::Devices([device(dev), device(dev / 2)].map(|d| d.into_boxed_str()).into_iter().collect())),
                    1 => (Purpose::Alerts, Filter::Devices([device(dev)].map(|d| d.into_boxed_str()).into_iter().collect())),
                    _ => (Purpose::Alerts, Filter::All),
                };
                s.add(key, purpose, &filter);
                open.push((key, purpose, filter));
                for d in 0..5u8 {
                    for event in [Event::RealtimeUpdate, Event::MachineAlert] {
                        let f = frame(event, &device(d));
                        proptest::prop_assert_eq!(who(&s, &f), naive(&open, &f));
                    }
                }
            }
        }
    }
}

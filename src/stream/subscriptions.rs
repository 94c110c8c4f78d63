//! A reactor's index from device to the streams that want it, so routing a
//! frame costs one hash lookup plus its subscribers, not a scan of every
//! stream. Data and alert streams are indexed apart since the same device's
//! events go to one kind or the other.
//!
//! Each device's subscribers are a short `Vec` (most devices have a few), or,
//! past [`FEW`], an insertion-ordered set: fan-out walks a dense array
//! either way, and on a hot device a stream leaves in O(1) (a swap with the
//! last), so a reconnect storm there is not quadratic.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexSet;

/// Subscribers a device keeps in a plain `Vec` (linear removal is cheaper
/// than hashing at this size, and a set costs far more memory).
const FEW: usize = 32;

/// The streams subscribed to one device.
enum Subscribers {
    Few(Vec<usize>),
    Many(IndexSet<usize>),
}

impl Subscribers {
    fn one(stream: usize) -> Subscribers {
        Subscribers::Few(vec![stream])
    }

    fn insert(&mut self, stream: usize) {
        match self {
            Subscribers::Few(v) if v.contains(&stream) => {}
            Subscribers::Few(v) if v.len() < FEW => v.push(stream),
            Subscribers::Few(v) => {
                let mut set: IndexSet<usize> = v.drain(..).collect();
                set.insert(stream);
                *self = Subscribers::Many(set);
            }
            Subscribers::Many(set) => {
                set.insert(stream);
            }
        }
    }

    fn remove(&mut self, stream: usize) {
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
            Subscribers::Few(v) => v.iter().for_each(|s| f(*s)),
            Subscribers::Many(set) => set.iter().for_each(|s| f(*s)),
        }
    }
}

use crate::stream::frame::{Event, Frame, Purpose};

/// Which events a stream receives.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Events of these devices.
    Devices(Arc<[Box<str>]>),
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
                let table = self.table(purpose);
                for d in devices.iter() {
                    // Look up before inserting: the key is cloned only for a
                    // device nobody here watched yet.
                    match table.get_mut(&**d) {
                        Some(set) => {
                            set.insert(stream);
                        }
                        None => {
                            table.insert(d.clone(), Subscribers::one(stream));
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
                        list.remove(stream);
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
                    0 => (Purpose::Data, Filter::Devices([device(dev), device(dev / 2)].map(|d| d.into_boxed_str()).into())),
                    1 => (Purpose::Alerts, Filter::Devices([device(dev)].map(|d| d.into_boxed_str()).into())),
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

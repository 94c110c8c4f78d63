//! The embedded store: the same keys as Redis (tickets with a lifetime,
//! ownership sets, status snapshots), held in process for a gateway without
//! Redis. Answers synchronously; a mutex guards maps that are touched once per
//! request, never per event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::store::protocol::{device_id, Job, Outcome, Reply, StreamFacts, MINT_WINDOW_MS};
use crate::time::epoch_ms;

#[derive(Default)]
struct Maps {
    /// ticket id -> (owner, expiry in epoch ms)
    tickets: HashMap<String, (Box<str>, u64)>,
    /// user id -> owned device ids
    devices: HashMap<Box<str>, HashSet<String>>,
    /// device id -> status JSON
    statuses: HashMap<String, String>,
    /// user id -> times (epoch ms) of the tickets minted in the last minute
    mints: HashMap<Box<str>, VecDeque<u64>>,
    puts_since_sweep: usize,
}

#[derive(Default)]
pub struct Memory {
    maps: Mutex<Maps>,
    /// In-process tests: lookups held here instead of answered, so they can
    /// finish late, in any order, or never (see [`Memory::hold`]).
    held: Mutex<Option<Vec<(Job, Reply)>>>,
}

impl Memory {
    /// From now on, lookups that someone waits for are held, not answered,
    /// until [`Memory::take_held`] hands them to the caller (tests drive
    /// the reactor's state machine through lookups that finish late).
    pub fn hold(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// The lookups held so far.
    pub fn take_held(&self) -> Vec<(Job, Reply)> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Runs `job` for `reply`: its outcome now, or None while held.
    pub fn submit(&self, job: Job, reply: Reply) -> Option<Outcome> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_mut() {
            Some(queue) => {
                queue.push((job, reply));
                None
            }
            None => {
                drop(held);
                Some(self.run(job))
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `SADD user:<user>:devices <device>`.
    pub fn grant(&self, user: &str, device: &str) {
        self.lock()
            .devices
            .entry(user.into())
            .or_default()
            .insert(device.to_owned());
    }

    /// Replaces the devices `user` owns (what the main app would do to
    /// `user:<user>:devices` before publishing `sse:access-changed`).
    pub fn set_devices(&self, user: &str, devices: HashSet<String>) {
        let mut m = self.lock();
        if devices.is_empty() {
            m.devices.remove(user);
        } else {
            m.devices.insert(user.into(), devices);
        }
    }

    /// `SET machine:<device>:status <json>`.
    pub fn set_status(&self, device: &str, json: String) {
        self.lock().statuses.insert(device.to_owned(), json);
    }

    pub fn run(&self, job: Job) -> Outcome {
        let now = epoch_ms();
        let mut m = self.lock();
        let alive = |m: &Maps, id: &str| m.tickets.get(id).is_some_and(|(_, exp)| *exp > now);
        match job {
            Job::PutTicket {
                id,
                user,
                exp_secs,
                per_minute,
            } => {
                m.puts_since_sweep += 1;
                if m.puts_since_sweep >= 1024 {
                    m.puts_since_sweep = 0;
                    m.tickets.retain(|_, (_, exp)| *exp > now);
                    m.mints
                        .retain(|_, times| times.back().is_some_and(|t| t + MINT_WINDOW_MS > now));
                }
                let times = m.mints.entry(Box::from(&*user.key)).or_default();
                while times.front().is_some_and(|t| t + MINT_WINDOW_MS <= now) {
                    times.pop_front();
                }
                if times.len() >= per_minute as usize {
                    let oldest = times.front().copied().unwrap_or(now);
                    return Outcome::TooManyTickets {
                        retry_after_secs: (oldest + MINT_WINDOW_MS - now).div_ceil(1000).max(1),
                    };
                }
                times.push_back(now);
                m.tickets
                    .insert(id, (Box::from(&*user.key), exp_secs.saturating_mul(1000)));
                Outcome::TicketStored
            }
            Job::Owned { user } => Outcome::Owned(
                m.devices
                    .get(&*user.key)
                    .map(|set| {
                        set.iter()
                            .filter_map(|d| device_id(d.clone().into_bytes()))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            Job::DeleteTicket { id, user } => match m.tickets.get(&id) {
                Some((owner, exp)) if *exp > now => {
                    if **owner != *user.key {
                        return Outcome::NotOwner;
                    }
                    m.tickets.remove(&id);
                    Outcome::Deleted
                }
                _ => Outcome::NotFound,
            },
            Job::TicketAlive { id } => Outcome::TicketAlive(alive(&m, &id)),
            Job::StreamFacts {
                ticket_id,
                user,
                check,
                status_of,
                ..
            } => {
                let owned_by = m.devices.get(&*user.key);
                let mut facts = StreamFacts {
                    ticket_alive: alive(&m, &ticket_id),
                    ..StreamFacts::default()
                };
                match check {
                    Some(devices) => {
                        facts.owned = devices
                            .iter()
                            .map(|d| owned_by.is_some_and(|s| s.contains(d)))
                            .collect();
                    }
                    None => {
                        facts.owned_set = owned_by
                            .map(|s| s.iter().cloned().collect())
                            .unwrap_or_default()
                    }
                }
                facts.statuses = status_of
                    .iter()
                    .map(|d| m.statuses.get(d).cloned())
                    .collect();
                Outcome::Facts(Box::new(facts))
            }
            // Embedded publishing goes straight to the hub, and leases are
            // for several instances on one Redis: neither comes here.
            Job::Publish { .. } | Job::ReleaseLease { .. } => Outcome::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(key: &str) -> crate::auth::UserId {
        crate::auth::UserId::named(key)
    }

    #[test]
    fn tickets_live_for_their_ttl_and_only_owners_delete_them() {
        let m = Memory::default();
        let put = |id: &str, who: &str| {
            m.run(Job::PutTicket {
                id: id.into(),
                user: user(who),
                exp_secs: epoch_ms() / 1000 + 60,
                per_minute: 30,
            })
        };
        assert!(matches!(put("t1", "alice"), Outcome::TicketStored));
        assert!(matches!(
            m.run(Job::TicketAlive { id: "t1".into() }),
            Outcome::TicketAlive(true)
        ));
        assert!(matches!(
            m.run(Job::TicketAlive { id: "t2".into() }),
            Outcome::TicketAlive(false)
        ));
        assert!(matches!(
            m.run(Job::DeleteTicket {
                id: "t1".into(),
                user: user("bob")
            }),
            Outcome::NotOwner
        ));
        assert!(matches!(
            m.run(Job::DeleteTicket {
                id: "t1".into(),
                user: user("alice")
            }),
            Outcome::Deleted
        ));
        assert!(matches!(
            m.run(Job::DeleteTicket {
                id: "t1".into(),
                user: user("alice")
            }),
            Outcome::NotFound
        ));
        assert!(matches!(
            m.run(Job::TicketAlive { id: "t1".into() }),
            Outcome::TicketAlive(false)
        ));
        m.run(Job::PutTicket {
            id: "t0".into(),
            user: user("alice"),
            exp_secs: epoch_ms() / 1000,
            per_minute: 30,
        });
        assert!(
            matches!(
                m.run(Job::TicketAlive { id: "t0".into() }),
                Outcome::TicketAlive(false)
            ),
            "expired"
        );
    }

    #[test]
    fn minting_is_limited_per_user_per_minute() {
        let m = Memory::default();
        let put = |n: u32, who: &str| {
            m.run(Job::PutTicket {
                id: format!("{who}{n}"),
                user: user(who),
                exp_secs: epoch_ms() / 1000 + 60,
                per_minute: 3,
            })
        };
        for n in 0..3 {
            assert!(matches!(put(n, "alice"), Outcome::TicketStored));
        }
        match put(3, "alice") {
            Outcome::TooManyTickets { retry_after_secs } => {
                assert!((1..=60).contains(&retry_after_secs))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(put(0, "bob"), Outcome::TicketStored), "per user");
        assert!(matches!(
            m.run(Job::TicketAlive {
                id: "alice3".into()
            }),
            Outcome::TicketAlive(false)
        ));
    }

    #[test]
    fn stream_facts_report_ownership_and_statuses() {
        let m = Memory::default();
        m.grant("alice", "M1");
        m.grant("alice", "M2");
        m.set_status("M1", "{\"s\":1}".into());
        let facts = |check| match m.run(Job::StreamFacts {
            ticket_id: "none".into(),
            user: user("alice"),
            check,
            status_of: vec!["M1".into(), "M3".into()],
            lease: None,
            ip_lease: None,
        }) {
            Outcome::Facts(f) => *f,
            other => panic!("{other:?}"),
        };
        let f = facts(Some(vec!["M2".into(), "M3".into()]));
        assert_eq!(f.owned, vec![true, false]);
        assert!(!f.ticket_alive);
        assert_eq!(f.statuses, vec![Some("{\"s\":1}".to_owned()), None]);
        let mut set = facts(None).owned_set;
        set.sort();
        assert_eq!(set, vec!["M1", "M2"]);
    }
}

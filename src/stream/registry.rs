//! Open streams, shared by every reactor: who holds which stream, from which
//! IP. It enforces the per-user and per-IP limits and answers `/sse/status`.
//! A stream takes its slot when it opens and gives it back the moment its
//! socket closes, so a page reload never meets a 429. It also keeps one
//! copy of each device list its open streams watch: dashboards open many
//! streams of the same machines, and each would otherwise hold its own.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use slab::Slab;

use crate::auth::UserId;
use crate::config::limit_key;
use crate::metrics::Metrics;
use crate::stream::frame::Purpose;

/// A stream's id: a random (v4) UUID, kept as its 16 bytes.
pub type StreamId = uuid::Uuid;

/// A data stream's device list, one copy shared by every open stream of
/// the same devices (see [`Registry::devices`]). A thin pointer: 8 bytes
/// in each stream and in each slot, where an `Arc<[_]>` takes 16.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Devices(Arc<Box<[Box<str>]>>);

impl Devices {
    /// Streams and slots holding this copy (and the registry's own).
    fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl std::ops::Deref for Devices {
    type Target = [Box<str>];

    fn deref(&self) -> &[Box<str>] {
        &self.0
    }
}

/// Looked up by its devices: equal lists hash and compare alike.
impl std::borrow::Borrow<[Box<str>]> for Devices {
    fn borrow(&self) -> &[Box<str>] {
        &self.0
    }
}

impl From<Vec<Box<str>>> for Devices {
    fn from(list: Vec<Box<str>>) -> Devices {
        Devices(Arc::new(list.into_boxed_slice()))
    }
}

impl FromIterator<Box<str>> for Devices {
    fn from_iter<I: IntoIterator<Item = Box<str>>>(names: I) -> Devices {
        names.into_iter().collect::<Vec<_>>().into()
    }
}

/// A limit slot: the open stream that holds it, where it lives, and what
/// `/sse/status` lists of it.
#[derive(Clone, Debug)]
pub struct Slot {
    pub id: StreamId,
    pub purpose: Purpose,
    /// The data stream's devices (shared with its filter; empty for alerts).
    pub devices: Devices,
    pub connected_at_ms: u64,
    /// Where its socket lives: (reactor, connection key), in 32 bits each
    /// (reactors are threads, keys index a slab of descriptors).
    pub owner: (u32, u32),
}

/// Open streams per purpose: 32-bit in answers and checks, 16-bit where a
/// user's entry keeps them (see [`User`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts<N = u32> {
    pub alerts: N,
    pub data: N,
}

impl<N: Copy> Counts<N> {
    pub fn get(&self, p: Purpose) -> N {
        match p {
            Purpose::Alerts => self.alerts,
            Purpose::Data => self.data,
        }
    }

    fn slot(&mut self, p: Purpose) -> &mut N {
        match p {
            Purpose::Alerts => &mut self.alerts,
            Purpose::Data => &mut self.data,
        }
    }
}

impl Counts {
    pub fn add(&mut self, p: Purpose, n: u32) {
        *self.slot(p) += n;
    }

    pub fn to_json(self) -> Value {
        json!({"alerts": self.alerts, "data": self.data, "total": self.alerts + self.data})
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub alerts: u32,
    pub data: u32,
    pub per_ip: u32,
}

impl Limits {
    pub fn of(&self, p: Purpose) -> u32 {
        match p {
            Purpose::Alerts => self.alerts,
            Purpose::Data => self.data,
        }
    }

    pub fn to_json(self) -> Value {
        json!({"alerts": self.alerts, "data": self.data})
    }
}

/// A user's streams (of the purpose asked) and an address's streams held by
/// other instances, from their leases in Redis (0 in embedded mode).
#[derive(Clone, Copy, Debug, Default)]
pub struct Elsewhere {
    pub user: u32,
    pub ip: u32,
}

/// Why a stream may not open.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    User { purpose: Purpose, current: Counts },
    Ip { current: Counts, ip_streams: u32 },
}

/// A user's open streams on this instance: their counts, and the newest
/// of their slots in `Tables::slots` (older ones follow through
/// [`Row::next`]). Counts of 16 bits make a table entry 24 bytes with its
/// key, not 32: a user holds a handful of streams, and [`Registry::open`]
/// refuses the 65,536th of one purpose whatever the limit says.
struct User {
    counts: Counts<u16>,
    newest: u32,
}

impl User {
    fn counts(&self) -> Counts {
        Counts {
            alerts: self.counts.alerts.into(),
            data: self.counts.data.into(),
        }
    }
}

/// "No row": the end of a user's chain.
const NO_ROW: u32 = u32::MAX;

/// A slot as the registry stores it: a row of one dense table, linked to
/// the same user's next older slot. Most users hold one stream, and a row
/// per slot (48 bytes) costs less than a small vector per user (its header,
/// a heap chunk, a wider table entry).
struct Row {
    id: StreamId,
    devices: Devices,
    connected_at_ms: u64,
    owner: (u32, u32),
    next: u32,
    purpose: Purpose,
}

impl Row {
    fn slot(&self) -> Slot {
        Slot {
            id: self.id,
            purpose: self.purpose,
            devices: self.devices.clone(),
            connected_at_ms: self.connected_at_ms,
            owner: self.owner,
        }
    }
}

/// Open streams per address (limit key: an IPv4 address or an IPv6 /64),
/// in two tables keyed by the address's bits: 8 bytes an entry for IPv4
/// and 16 for IPv6, where an `IpAddr` key would make every entry 24. A
/// server on the internet sees about as many addresses as streams.
#[derive(Default)]
struct Addresses {
    v4: HashMap<u32, u32>,
    /// The /64's upper 64 bits (the rest of a limit key is zero).
    v6: HashMap<u64, u32>,
}

impl Addresses {
    fn get(&self, ip: IpAddr) -> u32 {
        let n = match ip {
            IpAddr::V4(v4) => self.v4.get(&u32::from(v4)),
            IpAddr::V6(v6) => self.v6.get(&net64(v6)),
        };
        n.copied().unwrap_or(0)
    }

    fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => *self.v4.entry(u32::from(v4)).or_default() += 1,
            IpAddr::V6(v6) => *self.v6.entry(net64(v6)).or_default() += 1,
        }
    }

    /// One stream fewer; the entry goes at zero.
    fn remove(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => one_fewer(&mut self.v4, u32::from(v4)),
            IpAddr::V6(v6) => one_fewer(&mut self.v6, net64(v6)),
        }
    }

    /// Every address with open streams, as a limit key.
    fn keys(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.keys().map(|&k| IpAddr::from(Ipv4Addr::from(k)));
        let v6 = self
            .v6
            .keys()
            .map(|&k| IpAddr::from(Ipv6Addr::from(u128::from(k) << 64)));
        v4.chain(v6)
    }
}

/// An IPv6 /64's upper 64 bits.
fn net64(v6: Ipv6Addr) -> u64 {
    (u128::from(v6) >> 64) as u64
}

fn one_fewer<K: std::hash::Hash + Eq>(table: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = table.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            table.remove(&key);
        }
    }
}

#[derive(Default)]
struct Tables {
    /// Keyed by user id, shared (not copied) with the lease renewer.
    users: HashMap<Arc<str>, User>,
    /// Every open stream's slot, chained per user from `User::newest`.
    slots: Slab<Row>,
    ips: Addresses,
    total: usize,
    /// The device lists of open streams, one copy each (see [`Registry::devices`]).
    lists: HashSet<Devices>,
    /// Streams closed since `lists` last dropped the lists nobody holds.
    closed_since_sweep: usize,
}

impl Tables {
    /// A user's rows, newest first.
    fn rows<'a>(&'a self, u: &User) -> impl Iterator<Item = &'a Row> {
        let mut next = u.newest;
        std::iter::from_fn(move || {
            let row = self.slots.get(next as usize)?;
            next = row.next;
            Some(row)
        })
    }
}

pub struct Registry {
    tables: Mutex<Tables>,
    pub limits: Limits,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Registry {
        Registry {
            tables: Mutex::new(Tables::default()),
            limits,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `stream` from `ip`, or says which limit is reached.
    /// `elsewhere` counts the user's streams of this purpose and the
    /// address's streams on other instances. IPv6 addresses count per /64.
    pub fn open(
        &self,
        user: &UserId,
        ip: IpAddr,
        stream: Slot,
        elsewhere: Elsewhere,
    ) -> Result<(), Refusal> {
        let ip = limit_key(ip);
        let mut t = self.lock();
        let purpose = stream.purpose;
        let mut current = t
            .users
            .get(&*user.key)
            .map(User::counts)
            .unwrap_or_default();
        let here = current.get(purpose);
        let slot = current.slot(purpose);
        *slot = slot.saturating_add(elsewhere.user);
        let limit = match purpose {
            Purpose::Alerts => self.limits.alerts,
            Purpose::Data => self.limits.data,
        };
        if current.get(purpose) >= limit || here >= u32::from(u16::MAX) {
            return Err(Refusal::User { purpose, current });
        }
        let ip_streams = t.ips.get(ip).saturating_add(elsewhere.ip);
        if ip_streams >= self.limits.per_ip {
            return Err(Refusal::Ip {
                current,
                ip_streams,
            });
        }
        t.ips.add(ip);
        let t = &mut *t;
        let u = t.users.entry(user.key.clone()).or_insert(User {
            counts: Counts::default(),
            newest: NO_ROW,
        });
        *u.counts.slot(purpose) += 1;
        // Rows are open streams, far fewer than 2^32 - 1.
        u.newest = t.slots.insert(Row {
            id: stream.id,
            devices: stream.devices,
            connected_at_ms: stream.connected_at_ms,
            owner: stream.owner,
            next: u.newest,
            purpose,
        }) as u32;
        t.total += 1;
        self.metrics.stream_gauge(purpose).fetch_add(1, Relaxed);
        self.metrics.streams_opened.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The shared copy of the device list `devices`: the one an open stream
    /// already holds, or a new one kept for the streams that follow.
    pub fn devices(&self, devices: &[String]) -> Devices {
        let list: Vec<Box<str>> = devices.iter().map(|d| d.as_str().into()).collect();
        let mut t = self.lock();
        if let Some(shared) = t.lists.get(&list[..]) {
            return shared.clone();
        }
        let shared: Devices = list.into();
        t.lists.insert(shared.clone());
        shared
    }

    /// Gives back the slot of stream `id`.
    pub fn close(&self, user: &str, ip: IpAddr, id: StreamId) {
        let ip = limit_key(ip);
        let mut t = self.lock();
        t.closed_since_sweep += 1;
        if t.closed_since_sweep > t.lists.len().max(64) {
            // Lists only `lists` holds belong to no stream any more. Swept
            // once per as many closes as there are lists: O(1) per close.
            t.closed_since_sweep = 0;
            t.lists.retain(|l| l.holders() > 1);
        }
        let t = &mut *t;
        let Some(u) = t.users.get_mut(user) else {
            return;
        };
        // Find the row in the user's chain, and the row before it.
        let (mut before, mut at) = (NO_ROW, u.newest);
        while at != NO_ROW && t.slots[at as usize].id != id {
            (before, at) = (at, t.slots[at as usize].next);
        }
        if at == NO_ROW {
            return;
        }
        let row = t.slots.remove(at as usize);
        match before {
            NO_ROW => u.newest = row.next,
            _ => t.slots[before as usize].next = row.next,
        }
        let purpose = row.purpose;
        *u.counts.slot(purpose) -= 1;
        if u.newest == NO_ROW {
            t.users.remove(user);
        }
        t.ips.remove(ip);
        t.total -= 1;
        self.metrics.stream_gauge(purpose).fetch_sub(1, Relaxed);
    }

    /// A user's counts and open streams, oldest first.
    pub fn of(&self, user: &UserId) -> (Counts, Vec<Slot>) {
        let t = self.lock();
        let Some(u) = t.users.get(&*user.key) else {
            return Default::default();
        };
        let mut slots: Vec<Slot> = t.rows(u).map(Row::slot).collect();
        slots.reverse();
        (u.counts(), slots)
    }

    /// Where the user's streams of `purpose` live: (reactor, connection).
    pub fn holders(&self, user: &UserId, purpose: Purpose) -> Vec<(usize, usize)> {
        let t = self.lock();
        t.users.get(&*user.key).map_or_else(Vec::new, |u| {
            t.rows(u)
                .filter(|r| r.purpose == purpose)
                .map(|r| (r.owner.0 as usize, r.owner.1 as usize))
                .collect()
        })
    }

    /// What this instance holds leases on, for their renewal: each user
    /// with open streams of a purpose, and each address (limit key) with
    /// open streams. One pass under the lock, O(users + addresses), copying
    /// no string: user ids are shared.
    pub fn lease_holders(&self) -> (Vec<(Arc<str>, Purpose)>, Vec<IpAddr>) {
        let t = self.lock();
        let mut users = Vec::with_capacity(t.users.len());
        for (user, u) in &t.users {
            for p in [Purpose::Alerts, Purpose::Data] {
                if u.counts.get(p) > 0 {
                    users.push((user.clone(), p));
                }
            }
        }
        (users, t.ips.keys().collect())
    }

    pub fn total(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str, purpose: Purpose) -> Slot {
        Slot {
            id: sid(id),
            purpose,
            devices: Devices::from(Vec::new()),
            connected_at_ms: 0,
            owner: (0, 0),
        }
    }

    /// A test id from a short name.
    fn sid(name: &str) -> StreamId {
        uuid::Uuid::from_u128(name.bytes().fold(1, |h, b| h * 131 + u128::from(b)))
    }

    /// The user table holds an entry per user with open streams: its key
    /// (the shared id) and 8 bytes of counts and chain.
    #[test]
    fn a_user_entry_is_24_bytes() {
        assert_eq!(std::mem::size_of::<(Arc<str>, User)>(), 24);
    }

    /// Counts are 16 bits: past them a stream is refused as over the
    /// user's limit, even where the limit is higher, and the counts stay
    /// exact on the way down.
    #[test]
    fn a_user_holds_at_most_65535_streams_of_a_purpose_whatever_the_limit() {
        let limits = Limits {
            alerts: u32::MAX,
            data: u32::MAX,
            per_ip: u32::MAX,
        };
        let r = Registry::new(limits, Arc::default());
        let (user, ip) = (UserId::named("service"), "10.0.0.1".parse().unwrap());
        let slot = |n: u32| Slot {
            id: uuid::Uuid::from_u128(u128::from(n) + 1),
            ..stream("", Purpose::Data)
        };
        let max = u32::from(u16::MAX);
        for n in 0..max {
            assert_eq!(r.open(&user, ip, slot(n), Elsewhere::default()), Ok(()));
        }
        let refused = r.open(&user, ip, slot(max), Elsewhere::default());
        let current = Counts {
            alerts: 0,
            data: max,
        };
        assert_eq!(
            refused,
            Err(Refusal::User {
                purpose: Purpose::Data,
                current
            })
        );
        assert_eq!(
            r.open(
                &user,
                ip,
                stream("a", Purpose::Alerts),
                Elsewhere::default()
            ),
            Ok(())
        );
        r.close(&user.key, ip, slot(7).id);
        assert_eq!(
            r.of(&user).0,
            Counts {
                alerts: 1,
                data: max - 1
            }
        );
        assert_eq!(r.open(&user, ip, slot(max), Elsewhere::default()), Ok(()));
    }

    #[test]
    fn streams_of_the_same_devices_share_one_list_until_none_holds_it() {
        let r = Registry::new(
            Limits {
                alerts: 10,
                data: 10,
                per_ip: 1000,
            },
            Arc::default(),
        );
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let a = r.devices(&list(&["press-1", "press-2"]));
        let b = r.devices(&list(&["press-1", "press-2"]));
        let c = r.devices(&list(&["press-2", "press-1"]));
        assert!(Arc::ptr_eq(&a.0, &b.0), "an equal list is the same copy");
        assert!(!Arc::ptr_eq(&a.0, &c.0), "another order is another list");
        assert_eq!(
            a.iter().map(|d| &**d).collect::<Vec<_>>(),
            ["press-1", "press-2"]
        );
        // Held by a stream, a list survives any number of closes; dropped
        // by every stream, it goes with the next sweep.
        drop(b);
        drop(c);
        let (user, ip) = (UserId::named("u"), "127.0.0.1".parse().unwrap());
        for _ in 0..=64 {
            r.close(&user.key, ip, sid("none"));
        }
        let t = r.lock();
        assert_eq!(t.lists.len(), 1);
        assert!(t.lists.contains(&a));
    }

    /// The chained rows against a naive model: a list of slots per user.
    /// Random opens and closes over a few users; after each, every user's
    /// slots (in opening order), holders and counts agree.
    #[test]
    fn chained_rows_agree_with_a_list_per_user() {
        let r = Registry::new(
            Limits {
                alerts: 4,
                data: 4,
                per_ip: 1000,
            },
            Arc::default(),
        );
        let users: Vec<UserId> = ["a", "b", "c"].map(UserId::named).to_vec();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut model: HashMap<usize, Vec<(StreamId, Purpose, u64)>> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in 0..3000u32 {
            let who = (next() % 3) as usize;
            let held = model.entry(who).or_default();
            if next() % 2 == 0 {
                let purpose = [Purpose::Alerts, Purpose::Data][(next() % 2) as usize];
                let mut slot = stream(&n.to_string(), purpose);
                slot.owner = (0, n);
                slot.connected_at_ms = u64::from(n) * 7;
                let full = held.iter().filter(|h| h.1 == purpose).count() >= 4;
                let opened = r.open(&users[who], ip, slot, Elsewhere::default());
                assert_eq!(opened.is_ok(), !full);
                if !full {
                    held.push((sid(&n.to_string()), purpose, u64::from(n) * 7));
                }
            } else if !held.is_empty() {
                let (id, _, _) = held.remove((next() % held.len() as u64) as usize);
                r.close(&users[who].key, ip, id);
            }
            for (i, user) in users.iter().enumerate() {
                let want = model.get(&i).cloned().unwrap_or_default();
                let (counts, slots) = r.of(user);
                let got: Vec<(StreamId, Purpose, u64)> = slots
                    .iter()
                    .map(|s| (s.id, s.purpose, s.connected_at_ms))
                    .collect();
                assert_eq!(got, want, "user {i} after step {n}");
                let data = want.iter().filter(|w| w.1 == Purpose::Data).count();
                assert_eq!(counts.data as usize, data);
                assert_eq!(counts.alerts as usize, want.len() - data);
                let holders = r.holders(user, Purpose::Data);
                let owners: Vec<(usize, usize)> = slots
                    .iter()
                    .rev()
                    .filter(|s| s.purpose == Purpose::Data)
                    .map(|s| (0, s.owner.1 as usize))
                    .collect();
                assert_eq!(holders, owners);
            }
            assert_eq!(r.total(), model.values().map(Vec::len).sum::<usize>());
        }
        // A slot is one 48-byte row of one table, not a vector per user.
        assert_eq!(std::mem::size_of::<Row>(), 48);
    }

    /// Random streams from and gone from a few IPv4 addresses and IPv6 /64s
    /// (several addresses in one /64): after each, the counts and the
    /// addresses listed for lease renewal agree with a map keyed by
    /// `IpAddr`, the naive model.
    #[test]
    fn address_tables_agree_with_a_map_of_addresses() {
        let pool: Vec<IpAddr> = [
            "127.0.0.1",
            "10.1.2.3",
            "255.255.255.255",
            "0.0.0.0",
            "2001:db8::1",
            "2001:db8::ffff",
            "2001:db8:0:1::1",
            "::1",
            "fe80::1",
            "ffff:ffff:ffff:ffff::1",
        ]
        .iter()
        .map(|a| limit_key(a.parse().unwrap()))
        .collect();
        let mut table = Addresses::default();
        let mut model: HashMap<IpAddr, u32> = HashMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..4000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let ip = pool[(seed % pool.len() as u64) as usize];
            if seed & (1 << 40) == 0 {
                table.add(ip);
                *model.entry(ip).or_default() += 1;
            } else if let Some(n) = model.get_mut(&ip) {
                table.remove(ip);
                *n -= 1;
                if *n == 0 {
                    model.remove(&ip);
                }
            }
            for ip in &pool {
                let want = model.get(ip).copied().unwrap_or(0);
                assert_eq!(table.get(*ip), want, "{ip} after step {step}");
            }
            let mut got: Vec<IpAddr> = table.keys().collect();
            let mut want: Vec<IpAddr> = model.keys().copied().collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "after step {step}");
        }
    }

    #[test]
    fn limits_hold_and_closing_frees_the_slot_at_once() {
        let r = Registry::new(
            Limits {
                alerts: 1,
                data: 1,
                per_ip: 3,
            },
            Arc::default(),
        );
        let (alice, bob) = (UserId::named("alice"), UserId::named("bob"));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            r.open(
                &alice,
                ip,
                stream("a1", Purpose::Data),
                Elsewhere::default()
            ),
            Ok(())
        );
        assert_eq!(
            r.open(
                &alice,
                ip,
                stream("a2", Purpose::Data),
                Elsewhere::default()
            ),
            Err(Refusal::User {
                purpose: Purpose::Data,
                current: Counts { alerts: 0, data: 1 }
            })
        );
        assert_eq!(
            r.open(
                &alice,
                ip,
                stream("a3", Purpose::Alerts),
                Elsewhere::default()
            ),
            Ok(())
        );
        assert_eq!(
            r.open(&bob, ip, stream("b1", Purpose::Data), Elsewhere::default()),
            Ok(())
        );
        assert_eq!(
            r.open(
                &bob,
                ip,
                stream("b2", Purpose::Alerts),
                Elsewhere::default()
            ),
            Err(Refusal::Ip {
                current: Counts { alerts: 0, data: 1 },
                ip_streams: 3
            })
        );
        assert_eq!(r.total(), 3);
        r.close(&alice.key, ip, sid("a1"));
        r.close(&alice.key, ip, sid("a1")); // twice: harmless
        assert_eq!(
            r.open(
                &alice,
                ip,
                stream("a4", Purpose::Data),
                Elsewhere::default()
            ),
            Ok(())
        );
        let (counts, streams) = r.of(&alice);
        assert_eq!(counts, Counts { alerts: 1, data: 1 });
        assert_eq!(streams.len(), 2);
        for (u, id) in [(&alice, "a3"), (&alice, "a4"), (&bob, "b1")] {
            r.close(&u.key, ip, sid(id));
        }
        assert_eq!(r.total(), 0);
        assert_eq!(r.of(&alice).0, Counts::default());
        // A stream on another instance counts against the user's limit.
        assert_eq!(
            r.open(
                &alice,
                ip,
                stream("a5", Purpose::Data),
                Elsewhere { user: 1, ip: 0 }
            ),
            Err(Refusal::User {
                purpose: Purpose::Data,
                current: Counts { alerts: 0, data: 1 }
            })
        );
        assert_eq!(r.lease_holders(), (Vec::new(), Vec::new()));
    }

    #[test]
    fn the_per_ip_limit_counts_other_instances_and_ipv6_per_64() {
        let r = Registry::new(
            Limits {
                alerts: 9,
                data: 9,
                per_ip: 2,
            },
            Arc::default(),
        );
        let u = UserId::named("u");
        let a: IpAddr = "2001:db8:0:1::a".parse().unwrap();
        let b: IpAddr = "2001:db8:0:1::b".parse().unwrap();
        let other: IpAddr = "2001:db8:0:2::a".parse().unwrap();
        assert_eq!(
            r.open(&u, a, stream("1", Purpose::Data), Elsewhere::default()),
            Ok(())
        );
        // Same /64, one more held by another instance: full.
        let elsewhere = Elsewhere { user: 0, ip: 1 };
        assert!(matches!(
            r.open(&u, b, stream("2", Purpose::Data), elsewhere),
            Err(Refusal::Ip { ip_streams: 2, .. })
        ));
        assert_eq!(
            r.open(&u, b, stream("3", Purpose::Data), Elsewhere::default()),
            Ok(())
        );
        assert!(r
            .open(&u, a, stream("4", Purpose::Data), Elsewhere::default())
            .is_err());
        assert_eq!(
            r.open(&u, other, stream("5", Purpose::Data), Elsewhere::default()),
            Ok(())
        );
        r.close(&u.key, b, sid("1"));
        assert_eq!(
            r.open(&u, a, stream("6", Purpose::Data), Elsewhere::default()),
            Ok(())
        );
        let (users, mut ips) = r.lease_holders();
        assert_eq!(users, vec![(Arc::from("u"), Purpose::Data)]);
        ips.sort();
        let nets: Vec<IpAddr> = ["2001:db8:0:1::", "2001:db8:0:2::"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(ips, nets);
    }
}

//! Hierarchical timing wheel: the one place a reactor thread keeps its timers.
//!
//! Each reactor thread owns one `TimerWheel` holding every armed timer of its
//! connections (heartbeats, head-read timeouts, drain deadlines, ...), and asks
//! it how long `mio::Poll::poll` may sleep. With ~100,000 connections per
//! thread, anything that scans all timers per tick or per wake-up is too slow,
//! so this is a hashed hierarchical wheel in the style of the Linux kernel,
//! tokio and William Ahern's timeout.c (which Pushpin's timer ports): insert,
//! cancel and expiry are O(1) amortised, and idle time is skipped with bitmaps
//! instead of being walked one millisecond at a time.
//!
//! Layout: `LEVELS` levels of 64 slots. A level-`L` slot spans `64^L` ms, so
//! the wheel directly covers 2^36 ms (~2.2 years). A timer sits at the level of
//! the highest bit in which its deadline differs from the wheel's clock; when
//! the clock reaches the start of its slot, it is either fired (deadline
//! reached) or re-inserted one or more levels lower ("cascading"). Deadlines
//! beyond the horizon are parked in the farthest top-level slot and re-placed
//! from there each time the wheel comes round; only the real deadline decides
//! firing, so they are never early and never late.
//!
//! Timers live in a slab (`Vec` + free list) and are chained into intrusive
//! doubly linked lists, one per slot, so `cancel` unlinks in O(1); keys carry a
//! generation so a stale key can never cancel a timer that reused its slot.

#![forbid(unsafe_code)]

use std::fmt;
use std::num::NonZeroU32;

/// log2 of the number of slots per level.
const SLOT_BITS: u32 = 6;
/// Slots per level: 64, so one `u64` bitmap marks which slots are occupied.
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// 6 levels x 6 bits = 36 bits of time covered without re-cascading.
const LEVELS: usize = 6;
/// Farthest distance (ms) a deadline is placed at; beyond it, it is clamped.
const HORIZON: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// "No node" marker for the intrusive lists and the free list. Links are
/// 32-bit: a node is then 32 bytes, not 48, and a reactor has one per
/// connection (its heartbeat or deadline).
const NIL: u32 = u32::MAX;

/// Handle to an armed timer, returned by [`TimerWheel::insert`].
///
/// The generation makes keys single-use: once the timer fires or is
/// cancelled, its slab slot is recycled with a new generation, so an old key
/// held by a connection that forgot to clear it cannot touch the new timer.
/// Generations are never 0, so an `Option<TimerKey>` is 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: NonZeroU32,
}

/// Which list a slab node is currently on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    /// Not a timer: on the free list (linked through `next`).
    Free,
    /// Deadline was already due at insertion; fires on the next `poll`.
    Pending,
    /// In a wheel slot.
    Wheel { level: u8, slot: u8 },
}

struct Node {
    deadline: u64,
    value: u32,
    prev: u32,
    next: u32,
    /// Bumped every time the node is released. A stale key would look
    /// fresh again only after 2^32 - 1 reuses of its node; the reactor drops a
    /// key when its timer fires or is cancelled, so this is the second line.
    generation: NonZeroU32,
    home: Home,
}

/// A hierarchical timing wheel with 1 ms resolution over `u64` milliseconds.
pub struct TimerWheel {
    /// The wheel's clock: every timer with a deadline <= `now` has been
    /// handed out by `poll`, except those on the pending list.
    now: u64,
    nodes: Vec<Node>,
    free_head: u32,
    /// Head of the list of timers inserted with a deadline <= `now`.
    pending: u32,
    /// Head node of each slot's list.
    heads: [[u32; SLOTS]; LEVELS],
    /// Bit `s` of `occupied[l]` is set iff `heads[l][s]` is non-empty.
    occupied: [u64; LEVELS],
    len: usize,
}

impl TimerWheel {
    /// A wheel whose clock starts at `now` (ms).
    pub fn new(now: u64) -> Self {
        TimerWheel {
            now,
            nodes: Vec::new(),
            free_head: NIL,
            pending: NIL,
            heads: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            len: 0,
        }
    }

    /// Arms a timer that fires `value` at `deadline` (ms). A deadline at or
    /// before the wheel's current time fires on the next `poll`.
    pub fn insert(&mut self, deadline: u64, value: u32) -> TimerKey {
        let index = self.alloc(deadline, value);
        self.place(index);
        TimerKey {
            index,
            generation: self.node(index).generation,
        }
    }

    /// Disarms a timer; returns its value, or None if it already fired or was
    /// cancelled (stale key).
    pub fn cancel(&mut self, key: TimerKey) -> Option<u32> {
        let node = self.nodes.get(key.index as usize)?;
        if node.generation != key.generation || node.home == Home::Free {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index))
    }

    /// Advances the clock to `now` and appends the value of every timer whose
    /// deadline <= now to `expired` (each exactly once). `now` earlier than
    /// the current time is treated as the current time.
    ///
    /// Values come out in deadline order, except that timers which were
    /// already due when inserted come first, in no particular order.
    pub fn poll(&mut self, now: u64, expired: &mut Vec<u32>) {
        let now = now.max(self.now);

        while self.pending != NIL {
            let index = self.pending;
            self.unlink(index);
            expired.push(self.release(index));
        }

        // Visit occupied slots in time order. Each visit moves the clock to
        // the slot's start, so the cost depends on the number of occupied
        // slots passed, not on how much time elapsed.
        while let Some((level, slot, start)) = self.next_slot().filter(|&(_, _, at)| at <= now) {
            self.now = start;
            let mut index = self.take_slot(level, slot);
            while index != NIL {
                // Read the link first: `place` re-links the node elsewhere.
                let next = self.node(index).next;
                if self.node(index).deadline <= start {
                    expired.push(self.release(index));
                } else {
                    // Deadline lies later within this slot's span (or beyond
                    // the horizon): it lands on a lower level relative to the
                    // new clock, or back on the top level if clamped.
                    self.place(index);
                }
                index = next;
            }
        }

        // No occupied slot starts in (self.now, now], so every remaining
        // timer keeps the level and slot it would get if inserted now.
        self.now = now;
    }

    /// The earliest time at which `poll` could fire something: never later
    /// than the earliest deadline; may be earlier (a cascade point), but never
    /// earlier than the current time. None when empty.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.pending != NIL {
            return Some(self.now);
        }
        self.next_slot().map(|(_, _, start)| start)
    }

    /// Number of armed timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The occupied slot whose start time comes first, as
    /// `(level, slot, start)`; `start` is always > `self.now`.
    ///
    /// Invariant relied upon: every wheel timer sits where `place` would put
    /// it given the current clock. Then on levels below the top, occupied
    /// slots all lie after the clock's slot within the current span of the
    /// level above, and on the top level an occupied slot at or before the
    /// clock's slot stands for the next turn of the wheel. Both cases are
    /// "distance 1..=64 slots ahead, wrapping", computed below. It also
    /// follows that the lowest occupied level holds the earliest slot; taking
    /// the minimum over all levels costs six comparisons and does not lean on
    /// that.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for (level, &occupied) in self.occupied.iter().enumerate() {
            if occupied == 0 {
                continue;
            }
            let shift = level as u32 * SLOT_BITS;
            let current = (self.now >> shift) & SLOT_MASK;
            // Rotate so bit 0 is the slot right after the current one; the
            // trailing zero count is then the distance to the next occupied
            // slot, minus one.
            let first = ((current + 1) & SLOT_MASK) as u32;
            let distance = u64::from(occupied.rotate_right(first).trailing_zeros()) + 1;
            let slot = ((current + distance) & SLOT_MASK) as usize;
            let slot_start = self.now & !((1u64 << shift) - 1);
            // Saturation never changes the answer: only a deadline past the
            // current top-level span needs a wrapping slot, and once the clock
            // is in the last 2^36 ms of u64 no such deadline exists.
            let start = slot_start.saturating_add(distance << shift);
            if best.is_none_or(|(_, _, at)| start < at) {
                best = Some((level, slot, start));
            }
        }
        best
    }

    /// Links node `index` into the list its deadline calls for, relative to
    /// the current clock.
    fn place(&mut self, index: u32) {
        let deadline = self.node(index).deadline;
        if deadline <= self.now {
            self.push_front(index, Home::Pending);
            return;
        }
        // Far deadlines are placed as if due at the horizon: that slot starts
        // no later than the real deadline, and re-placing from there moves
        // them closer. The real deadline is what decides firing.
        let target = deadline.min(self.now.saturating_add(HORIZON - 1));
        // `target > self.now`, so they differ in at least one bit. The
        // highest differing bit picks the level: the timer must wait until
        // the clock reaches its slot at that level. Differences at or above
        // bit 36 (the deadline lies past the current top-level span) go on
        // the top level, whose slots wrap around.
        let differing = self.now ^ target;
        let level = ((63 - differing.leading_zeros()) / SLOT_BITS).min(LEVELS as u32 - 1);
        let slot = (target >> (level * SLOT_BITS)) & SLOT_MASK;
        self.push_front(
            index,
            Home::Wheel {
                level: level as u8,
                slot: slot as u8,
            },
        );
    }

    fn push_front(&mut self, index: u32, home: Home) {
        let head = match home {
            Home::Pending => &mut self.pending,
            Home::Wheel { level, slot } => {
                self.occupied[usize::from(level)] |= 1 << slot;
                &mut self.heads[usize::from(level)][usize::from(slot)]
            }
            Home::Free => return,
        };
        let old_head = std::mem::replace(head, index);
        if old_head != NIL {
            self.node(old_head).prev = index;
        }
        let node = self.node(index);
        node.prev = NIL;
        node.next = old_head;
        node.home = home;
    }

    /// Removes node `index` from whichever list it is on.
    fn unlink(&mut self, index: u32) {
        let Node {
            prev, next, home, ..
        } = *self.node(index);
        if prev != NIL {
            self.node(prev).next = next;
        } else {
            match home {
                Home::Pending => self.pending = next,
                Home::Wheel { level, slot } => {
                    let (level, slot) = (usize::from(level), usize::from(slot));
                    self.heads[level][slot] = next;
                    if next == NIL {
                        self.occupied[level] &= !(1 << slot);
                    }
                }
                Home::Free => {}
            }
        }
        if next != NIL {
            self.node(next).prev = prev;
        }
    }

    /// Detaches a whole slot list at once and returns its first node. The
    /// nodes keep their links among themselves until each is re-placed.
    fn take_slot(&mut self, level: usize, slot: usize) -> u32 {
        self.occupied[level] &= !(1 << slot);
        std::mem::replace(&mut self.heads[level][slot], NIL)
    }

    fn alloc(&mut self, deadline: u64, value: u32) -> u32 {
        self.len += 1;
        if self.free_head != NIL {
            let index = self.free_head;
            let node = &mut self.nodes[index as usize];
            self.free_head = node.next;
            node.deadline = deadline;
            node.value = value;
            return index;
        }
        // NIL is the one index a node never takes: 2^32 - 1 armed timers
        // would be 128 GiB of nodes, so running out is not a case to handle.
        let index = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&i| i != NIL)
            .expect("fewer than 2^32 - 1 timers");
        self.nodes.push(Node {
            deadline,
            value,
            prev: NIL,
            next: NIL,
            generation: NonZeroU32::MIN,
            home: Home::Free,
        });
        index
    }

    fn node(&mut self, index: u32) -> &mut Node {
        &mut self.nodes[index as usize]
    }

    /// Returns an already unlinked node to the free list and yields its value.
    /// Bumping the generation here is what invalidates outstanding keys.
    fn release(&mut self, index: u32) -> u32 {
        self.len -= 1;
        let free_head = self.free_head;
        let node = self.node(index);
        node.generation = node.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        node.home = Home::Free;
        node.prev = NIL;
        node.next = free_head;
        let value = node.value;
        self.free_head = index;
        value
    }
}

impl fmt::Debug for TimerWheel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.now)
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Naive reference: a map of value -> deadline that fires everything due.
    #[derive(Default)]
    struct Model {
        now: u64,
        timers: BTreeMap<u32, u64>,
    }

    impl Model {
        fn poll(&mut self, now: u64) -> Vec<u32> {
            self.now = self.now.max(now);
            let due: Vec<u32> = self
                .timers
                .iter()
                .filter(|&(_, &deadline)| deadline <= self.now)
                .map(|(&value, _)| value)
                .collect();
            for value in &due {
                self.timers.remove(value);
            }
            due
        }

        fn earliest(&self) -> Option<u64> {
            self.timers.values().copied().min()
        }
    }

    /// Drives the wheel and the model in lockstep and cross-checks them after
    /// every operation. Values are unique per harness so they identify timers.
    struct Harness {
        wheel: TimerWheel,
        model: Model,
        keys: BTreeMap<u32, TimerKey>,
    }

    impl Harness {
        fn new(now: u64) -> Self {
            Harness {
                wheel: TimerWheel::new(now),
                model: Model {
                    now,
                    ..Model::default()
                },
                keys: BTreeMap::new(),
            }
        }

        fn insert(&mut self, deadline: u64, value: u32) {
            let key = self.wheel.insert(deadline, value);
            assert!(self.keys.insert(value, key).is_none(), "value reused");
            self.model.timers.insert(value, deadline);
            self.check();
        }

        /// Cancels by value (the key is kept, so this can also test stale keys).
        fn cancel(&mut self, value: u32) -> Option<u32> {
            let key = self.keys[&value];
            let got = self.wheel.cancel(key);
            let want = self.model.timers.remove(&value).map(|_| value);
            assert_eq!(got, want, "cancel({value})");
            self.check();
            got
        }

        fn poll(&mut self, now: u64) -> Vec<u32> {
            let mut fired = Vec::new();
            self.wheel.poll(now, &mut fired);
            let mut sorted = fired.clone();
            sorted.sort_unstable();
            let want = self.model.poll(now);
            assert_eq!(sorted, want, "poll({now}) at model time {}", self.model.now);
            self.check();
            sorted
        }

        fn check(&self) {
            assert_eq!(self.wheel.len(), self.model.timers.len());
            assert_eq!(self.wheel.is_empty(), self.model.timers.is_empty());
            assert_eq!(self.wheel.now, self.model.now);
            match (self.wheel.next_deadline(), self.model.earliest()) {
                (None, None) => {}
                (Some(next), Some(earliest)) => {
                    assert!(next >= self.model.now, "next {next} before now");
                    assert!(
                        next <= earliest.max(self.model.now),
                        "next {next} after earliest deadline {earliest}"
                    );
                }
                (got, want) => panic!("next_deadline {got:?}, model earliest {want:?}"),
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Op {
        /// Insert a timer with a deadline relative to the case's start time.
        Insert(i64, u32),
        /// Cancel by value; expected result.
        Cancel(u32, Option<u32>),
        /// Poll at a time relative to the start; the values expected to fire.
        Poll(i64, &'static [u32]),
        /// Exact `next_deadline` expected (relative to the start).
        Next(Option<i64>),
    }
    use Op::*;

    const L1: i64 = 64;
    const L2: i64 = 64 * 64;
    const L3: i64 = 64 * 64 * 64;
    const L4: i64 = 1 << 24;
    const L5: i64 = 1 << 30;
    const L6: i64 = 1 << 36;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    const CASES: &[(&str, &[Op])] = &[
        (
            "empty wheel",
            &[Next(None), Poll(0, &[]), Poll(DAY, &[]), Next(None)],
        ),
        (
            "deadline in the past",
            &[
                Insert(-5, 1),
                Insert(-9999, 2),
                Next(Some(0)),
                Poll(0, &[1, 2]),
                Next(None),
            ],
        ),
        (
            "deadline == now",
            &[Insert(0, 1), Next(Some(0)), Poll(0, &[1]), Poll(1, &[])],
        ),
        (
            "one ms ahead",
            &[Insert(1, 1), Next(Some(1)), Poll(0, &[]), Poll(1, &[1])],
        ),
        (
            "level boundaries",
            &[
                Insert(L1 - 1, 1),
                Insert(L1, 2),
                Insert(L2 - 1, 3),
                Insert(L2, 4),
                Insert(L3 - 1, 5),
                Insert(L3, 6),
                Insert(L4 - 1, 7),
                Insert(L4, 8),
                Insert(L5 - 1, 9),
                Insert(L5, 10),
                Insert(L6 - 1, 11),
                Insert(L6, 12),
                Poll(L1 - 2, &[]),
                Poll(L1 - 1, &[1]),
                Poll(L1, &[2]),
                Poll(L2 - 2, &[]),
                Poll(L2 - 1, &[3]),
                Poll(L2, &[4]),
                Poll(L3 - 2, &[]),
                Poll(L3 - 1, &[5]),
                Poll(L3, &[6]),
                Poll(L4 - 2, &[]),
                Poll(L4 - 1, &[7]),
                Poll(L4, &[8]),
                Poll(L5 - 2, &[]),
                Poll(L5 - 1, &[9]),
                Poll(L5, &[10]),
                Poll(L6 - 2, &[]),
                Poll(L6 - 1, &[11]),
                Poll(L6, &[12]),
                Next(None),
            ],
        ),
        (
            "one big jump over every level",
            &[
                Insert(L1, 1),
                Insert(L2 + 1, 2),
                Insert(L3 + 7, 3),
                Insert(L4 - 1, 4),
                Insert(L5 + 3, 5),
                Insert(L6 + 5, 6),
                Poll(L6 + 4, &[1, 2, 3, 4, 5]),
                Poll(L6 + 5, &[6]),
            ],
        ),
        (
            "cancel before fire",
            &[
                Insert(100, 1),
                Insert(100, 2),
                Insert(5000, 3),
                Cancel(1, Some(1)),
                Cancel(3, Some(3)),
                Poll(100_000, &[2]),
            ],
        ),
        (
            "cancel after fire returns None",
            &[
                Insert(10, 1),
                Poll(10, &[1]),
                Cancel(1, None),
                Cancel(1, None),
            ],
        ),
        (
            "double cancel",
            &[
                Insert(10, 1),
                Cancel(1, Some(1)),
                Cancel(1, None),
                Poll(10, &[]),
            ],
        ),
        (
            "cancel a pending timer",
            &[Insert(-1, 1), Cancel(1, Some(1)), Next(None), Poll(0, &[])],
        ),
        (
            "many timers at the same deadline",
            &[
                Insert(300, 1),
                Insert(300, 2),
                Insert(300, 3),
                Insert(300, 4),
                Insert(300, 5),
                Cancel(3, Some(3)),
                Poll(299, &[]),
                Poll(300, &[1, 2, 4, 5]),
            ],
        ),
        (
            "huge jumps with few timers",
            &[
                Insert(HOUR, 1),
                Insert(3 * DAY, 2),
                Insert(365 * DAY, 3),
                Poll(HOUR - 1, &[]),
                Poll(HOUR, &[1]),
                Poll(3 * DAY - 1, &[]),
                Poll(3 * DAY, &[2]),
                Poll(365 * DAY - 1, &[]),
                Poll(365 * DAY, &[3]),
            ],
        ),
        (
            "clamp beyond the horizon",
            &[
                Insert(L6 + 7, 1),
                Insert((1 << 40) + 3, 2),
                Insert(1 << 44, 3),
                Poll(L6 + 6, &[]),
                Poll(L6 + 7, &[1]),
                Poll((1 << 40) + 2, &[]),
                Poll((1 << 40) + 3, &[2]),
                Poll((1 << 44) - 1, &[]),
                Poll(1 << 44, &[3]),
            ],
        ),
        (
            "time going backwards is ignored",
            &[
                Insert(10, 1),
                Poll(5, &[]),
                Poll(3, &[]),
                Insert(4, 2),
                Next(Some(5)),
                Poll(4, &[2]),
                Poll(10, &[1]),
            ],
        ),
        (
            "insert behind a clock that has moved",
            &[
                Poll(1000, &[]),
                Insert(500, 1),
                Insert(1000, 2),
                Insert(1001, 3),
                Poll(1000, &[1, 2]),
                Poll(1001, &[3]),
            ],
        ),
    ];

    /// Starting clocks: the plain, just before a top-level turn (so short
    /// deadlines cross a 2^36 boundary), mid-slot everywhere, a Unix-ms-like
    /// epoch, and close to the end of `u64`'s range.
    const STARTS: &[u64] = &[
        100_000,
        (1 << 36) - 3,
        (5 << 36) - 1,
        0x0000_0123_4567_89ab,
        1_700_000_000_000,
        (1 << 50) + (1 << 36) - (1 << 30),
        u64::MAX - (1 << 45),
    ];

    #[test]
    fn table() {
        for &(name, ops) in CASES {
            for &start in STARTS {
                let at = |offset: i64| {
                    start
                        .checked_add_signed(offset)
                        .unwrap_or_else(|| panic!("{name}: offset {offset} out of range"))
                };
                let mut h = Harness::new(start);
                for (step, &op) in ops.iter().enumerate() {
                    let ctx = format!("case {name:?}, start {start}, step {step}");
                    match op {
                        Insert(offset, value) => h.insert(at(offset), value),
                        Cancel(value, want) => assert_eq!(h.cancel(value), want, "{ctx}"),
                        Poll(offset, want) => assert_eq!(h.poll(at(offset)), want, "{ctx}"),
                        Next(want) => {
                            assert_eq!(h.wheel.next_deadline(), want.map(at), "{ctx}")
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stale_key_after_slot_reuse() {
        let mut wheel = TimerWheel::new(0);
        let old = wheel.insert(50, 1);
        assert_eq!(wheel.cancel(old), Some(1));
        let new = wheel.insert(50, 2);
        assert_eq!(old.index, new.index, "the slab slot should be reused");
        assert_ne!(old, new);
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(wheel.len(), 1);

        // Same through firing rather than cancelling.
        let mut fired = Vec::new();
        wheel.poll(50, &mut fired);
        assert_eq!(fired, [2]);
        let newer = wheel.insert(60, 3);
        assert_eq!(newer.index, new.index);
        assert_eq!(wheel.cancel(new), None);
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(wheel.cancel(newer), Some(3));
        assert!(wheel.is_empty());

        // A key from another wheel, beyond this slab, is simply stale.
        let foreign = TimerKey {
            index: NIL - 1,
            generation: NonZeroU32::MIN,
        };
        assert_eq!(wheel.cancel(foreign), None);
    }

    /// A reactor holds a node per connection and a key in each: 32 and 8
    /// bytes (they were 48 and 24 with 64-bit links and generations, and the
    /// key 12 while a generation could be 0).
    #[test]
    fn a_node_is_32_bytes_and_a_key_fits_in_8() {
        assert_eq!(std::mem::size_of::<Node>(), 32);
        assert_eq!(std::mem::size_of::<Option<TimerKey>>(), 8);
    }

    #[test]
    fn many_timers_at_the_same_deadline() {
        let mut h = Harness::new(7);
        for value in 0..20_000 {
            h.wheel.insert(7 + 4097, value);
            h.model.timers.insert(value, 7 + 4097);
        }
        h.check();
        let mut fired = Vec::new();
        h.wheel.poll(7 + 4096, &mut fired);
        assert!(fired.is_empty());
        h.wheel.poll(7 + 4097, &mut fired);
        fired.sort_unstable();
        assert_eq!(fired, (0..20_000).collect::<Vec<_>>());
        assert!(h.wheel.is_empty());
    }

    /// An hour (or years) of idle time costs a handful of slot visits, not one
    /// per millisecond: following `next_deadline` reaches the timer quickly.
    #[test]
    fn idle_time_is_skipped() {
        for (ahead, max_steps) in [(HOUR, 6), (30 * DAY, 6), (1 << 36, 7), (1 << 40, 40)] {
            let start = 1_700_000_000_123;
            let deadline = start + ahead as u64;
            let mut wheel = TimerWheel::new(start);
            wheel.insert(deadline, 1);
            let mut fired = Vec::new();
            let mut steps = 0;
            while let Some(next) = wheel.next_deadline() {
                assert!(next <= deadline);
                wheel.poll(next, &mut fired);
                steps += 1;
            }
            assert_eq!(fired, [1]);
            assert!(steps <= max_steps, "{ahead} ms ahead took {steps} steps");
        }
    }

    /// Deadlines past the horizon park in the farthest top-level slot, so the
    /// wheel wakes for them about once per 2^36 ms, not once per top slot.
    #[test]
    fn far_timers_park_in_the_farthest_slot() {
        let farthest = (1u64 << 36) - (1 << 30);
        for start in [0, 12_345, (1 << 36) - 1, 1_700_000_000_123] {
            for ahead in [(1u64 << 36) + (1 << 35), 1 << 40, u64::MAX / 2] {
                let mut wheel = TimerWheel::new(start);
                wheel.insert(start + ahead, 1);
                let next = wheel.next_deadline().unwrap_or(0);
                assert!(
                    next >= start + farthest,
                    "{start} + {ahead}: woke at {next}"
                );
                assert!(
                    next <= start + (1 << 36),
                    "{start} + {ahead}: woke at {next}"
                );
            }
        }
    }

    #[test]
    fn fires_in_deadline_order() {
        let mut wheel = TimerWheel::new(0);
        let mut rng = XorShift(0x5eed);
        let mut deadlines: Vec<u64> = (0..2000).map(|_| 1 + rng.next() % (1 << 20)).collect();
        for (value, &deadline) in (0..).zip(&deadlines) {
            wheel.insert(deadline, value);
        }
        let mut fired = Vec::new();
        wheel.poll(1 << 21, &mut fired);
        let fired: Vec<u64> = fired
            .iter()
            .map(|&value| deadlines[value as usize])
            .collect();
        deadlines.sort_unstable();
        assert_eq!(fired, deadlines);
    }

    /// Marsaglia's xorshift64: deterministic, dependency-free randomness.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// A distance spread over every level, its boundaries and beyond the
        /// horizon, weighted towards short ones like real timeouts.
        fn distance(&mut self) -> u64 {
            let r = self.next();
            match self.next() % 16 {
                0..=3 => r % 64,
                4..=6 => r % 4096,
                7..=8 => r % (1 << 18),
                9 => r % (1 << 24),
                10 => r % (1 << 30),
                11 => r % (1 << 37),
                12 => r % (1 << 42),
                13 => {
                    // Exactly on, or next to, a level boundary.
                    let boundary = 1u64 << (6 * (1 + r % 6));
                    boundary - 1 + (r >> 8) % 3
                }
                _ => r % 8,
            }
        }
    }

    fn random_ops(seed: u64, ops: usize) {
        let mut rng = XorShift(seed);
        let start = match seed % 3 {
            0 => rng.next() >> 20,
            1 => (rng.next() % 1024) << 36,
            _ => ((rng.next() % 1024) << 36) - 1 - rng.next() % 5000,
        };
        let mut h = Harness::new(start);
        let mut next_value = 0;
        for _ in 0..ops {
            match rng.next() % 10 {
                0..=3 => {
                    let now = h.model.now;
                    let deadline = if rng.next() & 7 == 0 {
                        now.saturating_sub(rng.distance())
                    } else {
                        now + rng.distance()
                    };
                    h.insert(deadline, next_value);
                    next_value += 1;
                }
                4..=5 if next_value > 0 => {
                    // Any value ever used: live, fired or already cancelled.
                    let value = (rng.next() % next_value as u64) as u32;
                    h.cancel(value);
                }
                6 => {
                    // What the reactor does: sleep until next_deadline.
                    if let Some(next) = h.wheel.next_deadline() {
                        h.poll(next);
                    }
                }
                7 if rng.next() & 63 == 0 => {
                    let now = h.model.now;
                    h.poll(now.saturating_sub(rng.distance()));
                }
                _ => {
                    let now = h.model.now;
                    h.poll(now + rng.distance());
                }
            }
        }
        // Drain: everything left fires exactly when the model says.
        while let Some(next) = h.wheel.next_deadline() {
            h.poll(next);
        }
        assert!(h.model.timers.is_empty());
    }

    #[test]
    fn random_against_model() {
        for seed in [1, 2, 3, 0xdead_beef, 0x1234_5678_9abc_def0, 42, 7, 1 << 40] {
            random_ops(seed, 30_000);
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum PropOp {
            Insert { ahead: u64, past: bool },
            Cancel(u32),
            PollBy(u64),
            PollNext,
        }

        fn distance() -> impl Strategy<Value = u64> {
            prop_oneof![
                0..70u64,
                0..5000u64,
                0..300_000u64,
                0..(1u64 << 31),
                0..(1u64 << 41),
                (1..7u32).prop_map(|level| 1u64 << (6 * level)),
            ]
        }

        fn op() -> impl Strategy<Value = PropOp> {
            prop_oneof![
                4 => (distance(), proptest::bool::weighted(0.1))
                    .prop_map(|(ahead, past)| PropOp::Insert { ahead, past }),
                2 => any::<u32>().prop_map(PropOp::Cancel),
                3 => distance().prop_map(PropOp::PollBy),
                1 => Just(PropOp::PollNext),
            ]
        }

        proptest! {
            #[test]
            fn matches_model(start in 0u64..(1 << 50), ops in proptest::collection::vec(op(), 1..300)) {
                let mut h = Harness::new(start);
                let mut next_value = 0;
                for op in ops {
                    let now = h.model.now;
                    match op {
                        PropOp::Insert { ahead, past } => {
                            let deadline = if past { now.saturating_sub(ahead) } else { now + ahead };
                            h.insert(deadline, next_value);
                            next_value += 1;
                        }
                        PropOp::Cancel(pick) if next_value > 0 => {
                            h.cancel(pick % next_value);
                        }
                        PropOp::Cancel(_) => {}
                        PropOp::PollBy(by) => {
                            h.poll(now + by);
                        }
                        PropOp::PollNext => {
                            if let Some(next) = h.wheel.next_deadline() {
                                h.poll(next);
                            }
                        }
                    }
                }
            }
        }
    }
}

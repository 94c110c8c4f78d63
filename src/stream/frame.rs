//! Event frames: the bytes a stream receives, encoded once per event and shared
//! (`Arc<Frame>`) by every subscriber's outbox.
//!
//! A frame from the bus is
//! ```text
//! id: <epoch_ms>-<seq>
//! event: <name>
//! data: <one line of JSON>
//!
//! ```
//! `system` frames (heartbeat, degraded, recovered, shutdown, replay-gap) and the
//! per-connection `machine-status` snapshot carry no `id:` line: they are not
//! part of the replayable sequence, and an id on them would move a client's
//! resume point past events still in flight to it.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

/// What an event is, which decides who receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    RealtimeUpdate,
    SpcUpdate,
    SpcSeriesUpdate,
    MachineAlert,
    AlarmUpdate,
    MachineStatus,
    System,
}

/// The two kinds of stream, and the events each one carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    Alerts,
    Data,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Alerts => "alerts",
            Purpose::Data => "data",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        match s {
            "alerts" => Some(Purpose::Alerts),
            "data" => Some(Purpose::Data),
            _ => None,
        }
    }
}

impl Event {
    /// Every event the bus can carry, for metrics labels.
    pub const ALL: [Event; 7] = [
        Event::RealtimeUpdate,
        Event::SpcUpdate,
        Event::SpcSeriesUpdate,
        Event::MachineAlert,
        Event::AlarmUpdate,
        Event::MachineStatus,
        Event::System,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::RealtimeUpdate => "realtime-update",
            Event::SpcUpdate => "spc-update",
            Event::SpcSeriesUpdate => "spc-series-update",
            Event::MachineAlert => "machine-alert",
            Event::AlarmUpdate => "alarm-update",
            Event::MachineStatus => "machine-status",
            Event::System => "system",
        }
    }

    /// The Redis channel that carries this event, if any.
    pub fn from_channel(channel: &str) -> Option<Event> {
        Some(match channel {
            "mqtt:realtime:processed" => Event::RealtimeUpdate,
            "mqtt:spc:processed" => Event::SpcUpdate,
            "mqtt:spc-series:processed" => Event::SpcSeriesUpdate,
            "machine:alerts" => Event::MachineAlert,
            "machine:alarms" => Event::AlarmUpdate,
            _ => return None,
        })
    }

    /// The stream kind that receives this event (`System` goes to both).
    pub fn purpose(self) -> Option<Purpose> {
        match self {
            Event::MachineAlert | Event::AlarmUpdate => Some(Purpose::Alerts),
            Event::System => None,
            _ => Some(Purpose::Data),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The Redis channels the subscriber listens on.
pub const CHANNELS: [&str; 5] = [
    "mqtt:realtime:processed",
    "mqtt:spc:processed",
    "mqtt:spc-series:processed",
    "machine:alerts",
    "machine:alarms",
];

/// `<epoch_ms>-<seq>`, ordered by `ms` then `seq`. Embedded mode numbers
/// `seq` per process (strictly increasing, `ms` never smaller than the
/// previous id's); in Redis mode the id is the cluster log's entry id, which
/// Redis makes strictly increasing the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    /// Parses `<digits>-<digits>`; anything else is None.
    pub fn parse(s: &str) -> Option<EventId> {
        let (ms, seq) = s.trim().split_once('-')?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(EventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One encoded event.
#[derive(Debug)]
pub struct Frame {
    pub id: Option<EventId>,
    /// Where the frame stands in this process's sequence of bus frames
    /// (consecutive from one frame to the next, set by the hub; 0 for frames
    /// outside it): how a reactor sees that its mailbox skipped some.
    pub pos: u64,
    pub event: Event,
    /// The device the event is about; empty for `system`.
    pub device: Box<str>,
    /// The complete wire encoding, ending with the blank line.
    pub bytes: Box<[u8]>,
}

impl Frame {
    /// Encodes `id`/`event`/`data` into one buffer. `data` must be one line.
    pub fn encode(id: Option<EventId>, event: Event, device: &str, data: &[u8]) -> Frame {
        let mut bytes = Vec::with_capacity(data.len() + 64);
        if let Some(id) = id {
            use std::io::Write;
            let _ = writeln!(bytes, "id: {id}");
        }
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(event.name().as_bytes());
        bytes.extend_from_slice(b"\ndata: ");
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(b"\n\n");
        Frame {
            id,
            pos: 0,
            event,
            device: device.into(),
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// A `system` frame, `data: {"kind":"<kind>"...}`.
    pub fn system(data: &str) -> Arc<Frame> {
        Arc::new(Frame::encode(None, Event::System, "", data.as_bytes()))
    }

    /// `system` heartbeat with its timestamp.
    pub fn heartbeat(now_ms: u64) -> Arc<Frame> {
        let mut data = String::with_capacity(48);
        data.push_str(r#"{"kind":"heartbeat","ts":""#);
        crate::time::write_iso8601(&mut data, now_ms);
        data.push_str(r#""}"#);
        Frame::system(&data)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The `data` of the `system` frame that tells a stream it may have missed
/// events (refetch history).
pub const REPLAY_GAP: &str = r#"{"kind":"replay-gap"}"#;

/// Why a bus message did not become a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    UnknownChannel,
    /// Over `--max-event-bytes`.
    TooLarge,
    NotJsonObject,
    NoDeviceId,
}

/// A bus message checked and turned into the `data:` line of its frame.
#[derive(Debug)]
pub struct Message {
    pub event: Event,
    pub device: String,
    pub data: Vec<u8>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "deviceId", borrow)]
    device_id: std::borrow::Cow<'a, str>,
    #[serde(default)]
    timestamp: Present,
}

/// Whether a key was in the object, whatever its value, `null` included
/// (`Option` would read a `null` as absent, and a second `"timestamp"` key
/// would be appended).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Present, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Present(true))
    }
}

/// Checks a message from `channel` and builds its `data:` line: the message
/// as published (key order kept, line breaks, which valid JSON only has as
/// whitespace, turned into spaces), with `"timestamp"` appended when absent.
pub fn message(channel: &str, payload: &[u8], now_ms: u64) -> Result<Message, Rejected> {
    let event = Event::from_channel(channel).ok_or(Rejected::UnknownChannel)?;
    message_for(event, payload, now_ms)
}

/// As [`message`], for an event already known.
pub fn message_for(event: Event, payload: &[u8], now_ms: u64) -> Result<Message, Rejected> {
    let text = payload.trim_ascii();
    // JSON text is UTF-8 (RFC 8259 §8.1); the parser skips the strings it
    // does not keep without checking them.
    if text.first() != Some(&b'{') || std::str::from_utf8(text).is_err() {
        return Err(Rejected::NotJsonObject);
    }
    // A JSON object whose `deviceId` is not a string fails here too; tell the
    // two apart only for the count.
    let probe: Probe = match serde_json::from_slice(text) {
        Ok(p) => p,
        Err(e) if e.is_data() => return Err(Rejected::NoDeviceId),
        Err(_) => return Err(Rejected::NotJsonObject),
    };
    let mut data: Vec<u8> = text
        .iter()
        .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
        .collect();
    if !probe.timestamp.0 {
        // `text` ends with `}` (it parsed as an object) and has a deviceId, so
        // the object is not empty: a comma always belongs here.
        data.pop();
        let mut ts = String::with_capacity(40);
        ts.push_str(r#","timestamp":""#);
        crate::time::write_iso8601(&mut ts, now_ms);
        ts.push_str(r#""}"#);
        data.extend_from_slice(ts.as_bytes());
    }
    Ok(Message {
        event,
        device: probe.device_id.into_owned(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_769_517_296_789; // 2026-01-27T12:34:56.789Z

    #[test]
    fn frame_bytes_are_exact() {
        let id = EventId {
            ms: 1700000000000,
            seq: 7,
        };
        let f = Frame::encode(
            Some(id),
            Event::RealtimeUpdate,
            "M1",
            br#"{"deviceId":"M1"}"#,
        );
        assert_eq!(
            &*f.bytes,
            b"id: 1700000000000-7\nevent: realtime-update\ndata: {\"deviceId\":\"M1\"}\n\n"
        );
        let hb = Frame::heartbeat(NOW);
        assert_eq!(
            &*hb.bytes,
            b"event: system\ndata: {\"kind\":\"heartbeat\",\"ts\":\"2026-01-27T12:34:56.789Z\"}\n\n"
        );
    }

    #[test]
    fn channels_map_to_events() {
        let table = [
            ("mqtt:realtime:processed", "realtime-update", Purpose::Data),
            ("mqtt:spc:processed", "spc-update", Purpose::Data),
            (
                "mqtt:spc-series:processed",
                "spc-series-update",
                Purpose::Data,
            ),
            ("machine:alerts", "machine-alert", Purpose::Alerts),
            ("machine:alarms", "alarm-update", Purpose::Alerts),
        ];
        for (channel, name, purpose) in table {
            let e = Event::from_channel(channel).unwrap();
            assert_eq!(e.name(), name);
            assert_eq!(e.purpose(), Some(purpose));
            assert!(CHANNELS.contains(&channel));
        }
        assert_eq!(Event::from_channel("machine:other"), None);
    }

    #[test]
    fn messages_keep_their_timestamp_or_get_one() {
        let m = message(
            "mqtt:realtime:processed",
            br#"{"deviceId":"M1","data":{"T1":2},"timestamp":"x"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(m.device, "M1");
        assert_eq!(
            m.data,
            br#"{"deviceId":"M1","data":{"T1":2},"timestamp":"x"}"#
        );
        let m = message(
            "machine:alerts",
            b" {\"deviceId\":\"M1\",\n \"alert\":{}}\n",
            NOW,
        )
        .unwrap();
        assert_eq!(m.event, Event::MachineAlert);
        assert_eq!(
            String::from_utf8(m.data).unwrap(),
            r#"{"deviceId":"M1",  "alert":{},"timestamp":"2026-01-27T12:34:56.789Z"}"#
        );
        // A `null` timestamp is a timestamp kept, never a second key.
        let null = br#"{"deviceId":"M1","timestamp":null}"#;
        assert_eq!(message("machine:alarms", null, NOW).unwrap().data, null);
    }

    #[test]
    fn bad_messages_are_rejected_not_panicked_on() {
        let table: [(&[u8], Rejected); 10] = [
            (b"", Rejected::NotJsonObject),
            (b"not json", Rejected::NotJsonObject),
            (b"[\"M1\"]", Rejected::NotJsonObject),
            (b"{\"deviceId\":\"M1\"", Rejected::NotJsonObject),
            (b"{\"deviceId\":\"M1\"} trailing", Rejected::NotJsonObject),
            (b"{}", Rejected::NoDeviceId),
            (b"{\"deviceId\":7}", Rejected::NoDeviceId),
            (b"{\"deviceId\":null}", Rejected::NoDeviceId),
            (b"{\"device\":\"M1\"}", Rejected::NoDeviceId),
            // Not UTF-8 inside a string the parser only skips.
            (
                b"{\"deviceId\":\"M1\",\"data\":\"\xff\xfe\"}",
                Rejected::NotJsonObject,
            ),
        ];
        for (payload, want) in table {
            let got = message("mqtt:spc:processed", payload, NOW).map(|_| ());
            assert_eq!(got, Err(want), "{:?}", String::from_utf8_lossy(payload));
        }
        assert_eq!(
            message("nope", b"{}", NOW).map(|_| ()),
            Err(Rejected::UnknownChannel)
        );
    }

    #[test]
    fn escaped_device_ids_are_decoded() {
        let m = message(
            "mqtt:spc:processed",
            br#"{"deviceId":"Machine\u0020 1"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(m.device, "Machine  1");
    }

    #[test]
    fn event_ids_parse_and_order() {
        assert_eq!(EventId::parse("17-3"), Some(EventId { ms: 17, seq: 3 }));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "1 -2",
            "99999999999999999999999-1",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad}");
        }
        assert!(EventId { ms: 5, seq: 2 } > EventId { ms: 5, seq: 1 });
        assert_eq!(EventId { ms: 5, seq: 2 }.to_string(), "5-2");
    }

    proptest::proptest! {
        #[test]
        fn any_payload_gives_one_line_or_a_rejection(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Ok(m) = message("machine:alarms", &payload, NOW) {
                proptest::prop_assert!(!m.data.contains(&b'\n') && !m.data.contains(&b'\r'));
                let v: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
                proptest::prop_assert!(v.get("timestamp").is_some());
            }
        }

        #[test]
        fn any_object_with_a_device_becomes_valid_one_line_json(
            device in "\\PC{0,20}", key in "[a-z]{1,8}", n in proptest::prelude::any::<i64>(), pretty in proptest::prelude::any::<bool>()
        ) {
            let v = serde_json::json!({"deviceId": device, key: {"v": n}});
            let payload = if pretty { serde_json::to_vec_pretty(&v).unwrap() } else { serde_json::to_vec(&v).unwrap() };
            let m = message("mqtt:realtime:processed", &payload, NOW).unwrap();
            proptest::prop_assert_eq!(&m.device, &device);
            let out: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
            proptest::prop_assert_eq!(&out["deviceId"], &v["deviceId"]);
            proptest::prop_assert!(!m.data.contains(&b'\n'));
        }
    }
}

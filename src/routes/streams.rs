//! Opening streams: `GET /sse/stream` (data, by device) and `GET
//! /sse/alerts`. A request becomes a [`StreamRequest`] and one store lookup
//! (ticket alive, devices owned, status snapshots, a cluster-wide lease);
//! its outcome takes a registry slot and becomes an open [`Stream`], or a
//! refusal: 401, 403, 400, or 429 after a second look at the limit.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::tickets::ticket_param;
use super::{Action, Pending, Request, Resolution};
use crate::auth::ticket::Ticket;
use crate::config::limit_key;
use crate::context::Gateway;
use crate::http::head::Head;
use crate::http::query;
use crate::http::response::Response;
use crate::store::lease::LeaseAnswer;
use crate::store::protocol::{Job, StreamFacts};
use crate::stream::frame::{self, Event, Purpose};
use crate::stream::registry::{Elsewhere, Refusal, Slot, StreamId};
use crate::stream::subscriptions::Filter;
use crate::stream::Stream;
use crate::time::{epoch_ms, iso8601};

pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// A stream asked for, until the store has answered.
pub struct StreamRequest {
    /// The stream's id, chosen before the lookup so its lease can be taken
    /// in the same round trip.
    pub id: StreamId,
    pub ticket: Ticket,
    pub purpose: Purpose,
    pub devices: Vec<String>,
    pub include_status: bool,
    pub last_event_id: Option<String>,
    pub client: IpAddr,
    /// A limit refused this request once already (see [`Resolution::Retry`]).
    pub retried: bool,
}

/// The devices of a data stream: `deviceId` and/or `deviceIds` (comma
/// separated), in order, without repeats. Linear in the query, and it stops
/// at the first device past the limit.
fn devices(gw: &Gateway, head: &Head) -> Result<Vec<String>, Response> {
    let max = gw.config.max_devices as usize;
    let mut out: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let single = query::param(&head.query, "deviceId");
    let list = query::param(&head.query, "deviceIds");
    let entries = single
        .iter()
        .map(|s| s.as_ref())
        .chain(list.iter().flat_map(|l| l.split(',')));
    for d in entries {
        let d = d.trim();
        if d.is_empty() {
            return Err(Response::error(400, "Empty device id"));
        }
        if d.len() > MAX_DEVICE_ID_BYTES {
            return Err(Response::error(400, "Device id longer than 128 bytes"));
        }
        if seen.insert(d) {
            if out.len() == max {
                return Err(Response::error(
                    400,
                    &format!("At most {max} devices per stream"),
                ));
            }
            out.push(d.to_owned());
        }
    }
    if out.is_empty() {
        return Err(Response::error(400, "deviceId or deviceIds is required"));
    }
    Ok(out)
}

pub(super) fn stream_request(gw: &Gateway, req: &Request, purpose: Purpose) -> Action {
    let head = req.head;
    let ticket = match ticket_param(gw, head) {
        Ok(t) => t,
        Err(r) => return Action::Respond(r),
    };
    if !ticket.allows(purpose) {
        return Action::Respond(Response::error(
            403,
            "Ticket purpose does not match this stream",
        ));
    }
    let devices = match purpose {
        Purpose::Alerts => Vec::new(),
        Purpose::Data => match devices(gw, head) {
            Ok(d) => d,
            Err(r) => return Action::Respond(r),
        },
    };
    let include_status = purpose == Purpose::Data
        && !query::param(&head.query, "includeStatus")
            .is_some_and(|v| v.eq_ignore_ascii_case("false") || &*v == "0");
    // An empty header is no header: it must not hide the query parameter.
    let last_event_id = head
        .last_event_id
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| query::param(&head.query, "lastEventId").map(|c| c.into_owned()))
        .filter(|s| !s.is_empty());
    let request = StreamRequest {
        id: crate::auth::random_uuid(),
        ticket,
        purpose,
        devices,
        include_status,
        last_event_id,
        client: req.client,
        retried: false,
    };
    Action::Lookup(stream_job(gw, &request), Pending::Stream(request))
}

/// The store lookup a stream needs before it opens: ticket alive, devices
/// owned (or the owned set, for alerts), status snapshots, and in Redis mode
/// a cluster-wide lease.
pub fn stream_job(gw: &Gateway, r: &StreamRequest) -> Job {
    let check = match (r.purpose, r.ticket.admin) {
        (_, true) => Some(Vec::new()),
        (Purpose::Data, false) => Some(r.devices.clone()),
        (Purpose::Alerts, false) => None,
    };
    let limit = gw.registry.limits.of(r.purpose);
    Job::StreamFacts {
        ticket_id: r.ticket.id.clone(),
        user: r.ticket.user.clone(),
        check,
        status_of: if r.include_status {
            r.devices.clone()
        } else {
            Vec::new()
        },
        lease: gw
            .leases
            .as_ref()
            .map(|leases| leases.ask(&r.ticket.user.key, r.purpose, limit)),
        ip_lease: gw
            .leases
            .as_ref()
            .map(|leases| leases.ask_ip(limit_key(r.client), gw.registry.limits.per_ip)),
    }
}

fn too_many(gw: &Gateway, refusal: Refusal) -> Response {
    let limits = gw.registry.limits;
    let (message, current) = match refusal {
        Refusal::User {
            purpose: Purpose::Data,
            current,
        } => ("Data stream connection limit exceeded", current),
        Refusal::User { current, .. } => ("Alerts stream connection limit exceeded", current),
        Refusal::Ip { current, .. } => ("Too many connections from this IP", current),
    };
    let extra = json!({
        "currentConnections": current.to_json(),
        "limits": limits.to_json(),
        "maxConnectionsPerIp": limits.per_ip,
    });
    Response::with_extra(429, message, extra).header("Retry-After", "1")
}

pub(super) fn open(
    gw: &Gateway,
    mut s: StreamRequest,
    facts: StreamFacts,
    owner: (usize, usize),
) -> Resolution {
    let elsewhere = Elsewhere {
        user: facts.lease.others(),
        ip: facts.ip_lease.others(),
    };
    // One copy of the device list, shared by the registry, the filter and
    // the other open streams of the same devices.
    let devices = gw.registry.devices(&s.devices);
    let refusal = match (facts.lease, facts.ip_lease) {
        (LeaseAnswer::Refused { .. }, _) => {
            let mut current = gw.registry.of(&s.ticket.user).0;
            current.add(s.purpose, elsewhere.user);
            Some(Refusal::User {
                purpose: s.purpose,
                current,
            })
        }
        (_, LeaseAnswer::Refused { .. }) => {
            // The worker gave the user's lease back already.
            let current = gw.registry.of(&s.ticket.user).0;
            Some(Refusal::Ip {
                current,
                ip_streams: elsewhere.ip,
            })
        }
        _ => {
            let slot = Slot {
                id: s.id,
                purpose: s.purpose,
                // Empty for alerts streams.
                devices: devices.clone(),
                connected_at_ms: epoch_ms(),
                owner: (
                    u32::try_from(owner.0).unwrap_or(u32::MAX),
                    u32::try_from(owner.1).unwrap_or(u32::MAX),
                ),
            };
            let opened = gw.registry.open(&s.ticket.user, s.client, slot, elsewhere);
            if let (Err(_), LeaseAnswer::Granted { .. }) = (&opened, facts.lease) {
                gw.release_lease(&s.ticket.user.key, s.client, s.purpose);
            }
            opened.err()
        }
    };
    if let Some(refusal) = refusal {
        if s.retried {
            return Resolution::Respond(too_many(gw, refusal));
        }
        // A fresh id: the retry is a new stream.
        s.retried = true;
        s.id = crate::auth::random_uuid();
        let holders = gw.registry.holders(&s.ticket.user, s.purpose);
        return Resolution::Retry(Box::new(s), holders);
    }
    let id = s.id;
    let filter = match (s.purpose, s.ticket.admin) {
        (Purpose::Alerts, true) => Filter::All,
        (Purpose::Alerts, false) => {
            Filter::Devices(facts.owned_set.into_iter().map(Into::into).collect())
        }
        (Purpose::Data, _) => Filter::Devices(devices),
    };
    let mut snapshot = Vec::new();
    let now = iso8601(epoch_ms());
    for (device, status) in s.devices.iter().zip(facts.statuses) {
        let Some(status) = status else { continue };
        let data = serde_json::from_str::<Value>(&status).unwrap_or(Value::String(status));
        let body = json!({"deviceId": device, "data": data, "source": "cache", "timestamp": now})
            .to_string();
        snapshot.extend_from_slice(
            &frame::Frame::encode(None, Event::MachineStatus, device, body.as_bytes()).bytes,
        );
    }
    let ticket = uuid::Uuid::parse_str(&s.ticket.id).unwrap_or_default();
    Resolution::Open {
        stream: Box::new(Stream {
            id,
            ticket,
            user: s.ticket.user.key,
            admin: s.ticket.admin,
            client: s.client,
            purpose: s.purpose,
            filter,
            opened: 0,
            input: 0,
            next_heartbeat: 0,
            stalled_since: 0,
            unacked_kib: crate::stream::UNACKED_UNKNOWN,
        }),
        snapshot,
        last_event_id: s.last_event_id,
    }
}

//! What each request means. [`route`] turns a parsed request into an
//! [`Action`]: a response now, or a store [`Job`] whose outcome [`resolve`]
//! turns into a response or an open stream. Pure functions of the request and
//! the shared [`Gateway`] state: no sockets here, so they read like the
//! contract's endpoint list.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::ticket::Ticket;
use crate::auth::Identity;
use crate::bus::lease::LeaseAnswer;
use crate::bus::store::{Job, Outcome, StreamFacts};
use crate::bus::{Published, RedisState};
use crate::config::{canonical, Config};
use crate::gateway::Gateway;
use crate::http::head::{Head, Method};
use crate::http::query;
use crate::http::response::Response;
use crate::stream::frame::{self, Event, Purpose};
use crate::stream::registry::{ActiveStream, Refusal, StreamId};
use crate::time::{epoch_ms, iso8601};

pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// A request as the routes see it.
pub struct Request<'a> {
    pub head: &'a Head,
    pub body: &'a [u8],
    /// The client's address (after trusted-proxy resolution).
    pub client: IpAddr,
}

// Lives on the stack for one call; not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    Respond(Response),
    Lookup(Job, Pending),
}

/// A request waiting for its store outcome.
pub enum Pending {
    IssueTicket(Response),
    /// The id of the ticket being deleted.
    DeleteTicket(String),
    /// Embedded mode: the user whose devices changed.
    AccessChanged(crate::auth::UserId),
    Status(Ticket),
    Stream(StreamRequest),
    Publish,
}

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

/// Which events a stream receives.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Events of these devices.
    Devices(Arc<[Box<str>]>),
    /// Every device (an admin's alerts stream).
    All,
}

/// Everything a reactor needs to open a stream whose slot is already taken.
pub struct StreamSpec {
    pub id: StreamId,
    pub ticket: Ticket,
    pub purpose: Purpose,
    pub filter: Filter,
    pub client: IpAddr,
    /// `machine-status` frames to send first.
    pub snapshot: Vec<u8>,
    pub last_event_id: Option<String>,
}

pub enum Resolution {
    Respond(Response),
    Open(StreamSpec),
    /// A limit is reached, maybe only because the close of the user's
    /// previous stream (a page reload) has not been processed yet by the
    /// reactor that holds it, or by another instance. The reactor asks the
    /// holders (reactor, connection) to look at their sockets now, then looks
    /// again, once, before answering 429.
    Retry(Box<StreamRequest>, Vec<(usize, usize)>),
}

/// The client IP: the peer, or, when the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(config: &Config, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
    let peer = canonical(peer);
    let Some(xff) = forwarded_for.filter(|_| config.is_trusted_proxy(peer)) else {
        return peer;
    };
    let mut client = peer;
    for entry in xff.rsplit(',') {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !config.is_trusted_proxy(client) {
                    return client;
                }
            }
            // Garbage in the chain: trust nothing to its left.
            Err(_) => return client,
        }
    }
    client
}

const STATIC_CLIENT: &[u8] = include_bytes!("../../web/sse-client.js");
const DEMO_INDEX: &[u8] = include_bytes!("../../web/index.html");
const DEMO_APP: &[u8] = include_bytes!("../../web/app.js");
const DEMO_STYLE: &[u8] = include_bytes!("../../web/style.css");
const JS: &str = "text/javascript; charset=utf-8";

/// The methods a path answers, or None for an unknown path.
fn allowed(gw: &Gateway, path: &str) -> Option<&'static str> {
    Some(match path {
        "/health" | "/metrics" | "/sse/client.js" => "GET, HEAD",
        "/sse/alerts" | "/sse/stream" | "/sse/status" => "GET",
        "/sse/stream-ticket" | "/sse/publish" | "/sse/access-changed" => "POST",
        p if p.starts_with("/sse/stream-ticket/") => "DELETE",
        "/" | "/index.html" | "/app.js" | "/style.css" | "/demo/token" if gw.config.demo => {
            "GET, HEAD"
        }
        _ => return None,
    })
}

pub fn route(gw: &Gateway, req: &Request) -> Action {
    let head = req.head;
    let Some(allow) = allowed(gw, &head.path) else {
        return Action::Respond(Response::error(
            404,
            &format!("Cannot {} {}", method_name(head.method), head.path),
        ));
    };
    if head.method == Method::Options {
        return Action::Respond(preflight(gw, head, allow));
    }
    let method_ok = match head.method {
        Method::Get => allow.contains("GET"),
        Method::Head => allow.contains("HEAD"),
        Method::Post => allow.contains("POST"),
        Method::Delete => allow.contains("DELETE"),
        _ => false,
    };
    if !method_ok {
        return Action::Respond(
            Response::error(405, "Method Not Allowed").header("Allow", format!("{allow}, OPTIONS")),
        );
    }
    let respond = Action::Respond;
    match head.path.as_str() {
        "/health" => respond(health(gw)),
        "/metrics" => respond(Response::text(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            gw.metrics.render(
                gw.hub.redis_state().as_str(),
                gw.hub.mailboxes().iter().map(|m| m.depth()),
            ),
        )),
        "/sse/client.js" => {
            respond(Response::bytes(200, JS, STATIC_CLIENT).header("Cache-Control", "no-cache"))
        }
        "/" | "/index.html" => {
            respond(Response::bytes(200, "text/html; charset=utf-8", DEMO_INDEX))
        }
        "/app.js" => respond(Response::bytes(200, JS, DEMO_APP)),
        "/style.css" => respond(Response::bytes(200, "text/css; charset=utf-8", DEMO_STYLE)),
        "/demo/token" => respond(Response::json(
            200,
            &json!({"token": gw.demo_token.as_deref().unwrap_or("")}),
        )),
        "/sse/stream-ticket" => issue_ticket(gw, req),
        "/sse/publish" => publish(gw, req),
        "/sse/access-changed" => access_changed(gw, req),
        "/sse/status" => status_request(gw, head),
        "/sse/alerts" => stream_request(gw, req, Purpose::Alerts),
        "/sse/stream" => stream_request(gw, req, Purpose::Data),
        path => delete_ticket(gw, head, path.trim_start_matches("/sse/stream-ticket/")),
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Other => "this method on",
    }
}

fn preflight(gw: &Gateway, head: &Head, allow: &str) -> Response {
    let mut r = Response::empty(204).header("Allow", format!("{allow}, OPTIONS"));
    if gw.config.allowed_origin(head.origin.as_deref()).is_some() {
        let headers = head
            .access_control_request_headers
            .clone()
            .filter(|h| {
                h.len() < 512
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
            })
            .unwrap_or_else(|| "Authorization, Content-Type, Last-Event-ID".into());
        r = r
            .header("Access-Control-Allow-Methods", format!("{allow}, OPTIONS"))
            .header("Access-Control-Allow-Headers", headers)
            .header("Access-Control-Max-Age", "600");
    }
    r
}

fn health(gw: &Gateway) -> Response {
    let redis = gw.hub.redis_state();
    let down = redis == RedisState::Down;
    let body = json!({
        "status": if down { "degraded" } else { "ok" },
        "redis": redis.as_str(),
        "connections": gw.registry.total(),
        "uptimeSeconds": gw.started.elapsed().as_secs(),
    });
    Response::json(if down { 503 } else { 200 }, &body)
}

fn bearer(gw: &Gateway, head: &Head) -> Result<Identity, Response> {
    gw.tokens
        .verify_bearer(head.authorization.as_deref())
        .ok_or_else(|| Response::error(401, "Invalid or missing access token"))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TicketBody {
    #[serde(default)]
    ttl_seconds: Option<Value>,
    #[serde(default)]
    purpose: Option<Value>,
}

fn issue_ticket(gw: &Gateway, req: &Request) -> Action {
    let who = match bearer(gw, req.head) {
        Ok(w) => w,
        Err(r) => return Action::Respond(r),
    };
    let body = req.body.trim_ascii();
    let parsed: TicketBody = if body.is_empty() {
        TicketBody::default()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v @ Value::Object(_)) => serde_json::from_value(v).unwrap_or_default(),
            Ok(Value::Null) => TicketBody::default(),
            _ => return Action::Respond(Response::error(400, "Body must be a JSON object")),
        }
    };
    let ttl = match parsed.ttl_seconds {
        None | Some(Value::Null) => 300,
        Some(v) => match v
            .as_f64()
            .filter(|t| t.fract() == 0.0 && (60.0..=3600.0).contains(t))
        {
            Some(t) => t as u64,
            None => {
                return Action::Respond(Response::error(
                    400,
                    "ttlSeconds must be an integer from 60 to 3600",
                ))
            }
        },
    };
    let purpose = match parsed.purpose {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if Purpose::parse(&p).is_some() => Purpose::parse(&p),
        Some(_) => {
            return Action::Respond(Response::error(
                400,
                "purpose must be \"alerts\" or \"data\"",
            ))
        }
    };
    let minted = gw.tickets.mint(&who, purpose, ttl, epoch_ms() / 1000);
    let response = Response::json(
        200,
        &json!({"ticket": minted.token, "expiresInSeconds": ttl, "ticketId": minted.id}),
    );
    let job = Job::PutTicket {
        id: minted.id,
        user: who.user,
        ttl_secs: ttl,
        per_minute: gw.config.max_tickets_per_minute,
    };
    Action::Lookup(job, Pending::IssueTicket(response))
}

fn delete_ticket(gw: &Gateway, head: &Head, raw_id: &str) -> Action {
    let who = match bearer(gw, head) {
        Ok(w) => w,
        Err(r) => return Action::Respond(r),
    };
    let id = query::decode(raw_id)
        .map(|c| c.into_owned())
        .unwrap_or_default();
    if id.is_empty() || id.len() > 64 || id.contains('/') {
        return Action::Respond(Response::error(404, "Unknown ticket"));
    }
    Action::Lookup(
        Job::DeleteTicket {
            id: id.clone(),
            user: who.user,
        },
        Pending::DeleteTicket(id),
    )
}

fn ticket_param(gw: &Gateway, head: &Head) -> Result<Ticket, Response> {
    let Some(raw) = query::param(&head.query, "ticket").filter(|t| !t.is_empty()) else {
        return Err(Response::error(401, "Stream authentication required"));
    };
    gw.tickets
        .verify(&raw)
        .ok_or_else(|| Response::error(401, "Invalid or expired stream ticket"))
}

fn status_request(gw: &Gateway, head: &Head) -> Action {
    match ticket_param(gw, head) {
        Ok(t) => Action::Lookup(Job::TicketAlive { id: t.id.clone() }, Pending::Status(t)),
        Err(r) => Action::Respond(r),
    }
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

fn stream_request(gw: &Gateway, req: &Request, purpose: Purpose) -> Action {
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
        && !matches!(
            query::param(&head.query, "includeStatus").as_deref(),
            Some("false") | Some("0")
        );
    let last_event_id = head
        .last_event_id
        .clone()
        .or_else(|| query::param(&head.query, "lastEventId").map(|c| c.into_owned()))
        .filter(|s| !s.is_empty());
    let request = StreamRequest {
        id: StreamId::new_v4(),
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
            .map(|leases| leases.ask(&r.ticket.user, r.purpose, r.id, limit)),
    }
}

fn publish(gw: &Gateway, req: &Request) -> Action {
    let who = match bearer(gw, req.head) {
        Ok(w) => w,
        Err(r) => return Action::Respond(r),
    };
    if !who.admin {
        return Action::Respond(Response::error(403, "Publishing requires an admin token"));
    }
    #[derive(Deserialize)]
    struct Body {
        channel: String,
        message: Value,
    }
    let Ok(body) = serde_json::from_slice::<Body>(req.body) else {
        return Action::Respond(Response::error(
            400,
            "Body must be {\"channel\": \"...\", \"message\": {...}}",
        ));
    };
    let Some(event) = Event::from_channel(&body.channel) else {
        return Action::Respond(Response::error(
            400,
            &format!("Unknown channel: {}", frame::CHANNELS.join(", ")),
        ));
    };
    let payload = match body.message {
        Value::String(s) => s.into_bytes(),
        v => v.to_string().into_bytes(),
    };
    // Refuse here what the bus would drop, so the caller learns why.
    if let Err(e) = frame::message_for(event, &payload, epoch_ms()) {
        let why = match e {
            frame::Rejected::NoDeviceId => "message needs a string deviceId",
            _ => "message must be a JSON object",
        };
        return Action::Respond(Response::error(400, why));
    }
    match gw.store.memory() {
        Some(_) => match gw.hub.publish(&body.channel, &payload) {
            Ok(Published::Sent(id)) => Action::Respond(Response::json(
                200,
                &json!({"published": true, "id": id.to_string()}),
            )),
            Ok(Published::Held) => Action::Respond(Response::json(
                200,
                &json!({"published": true, "conflated": true}),
            )),
            Err(_) => Action::Respond(Response::error(400, "message was dropped")),
        },
        None => Action::Lookup(
            Job::Publish {
                channel: body.channel,
                payload,
            },
            Pending::Publish,
        ),
    }
}

/// `POST /sse/access-changed` (admin): `{"userId": ..., "devices"?: [...]}`.
/// Redis mode publishes the user id on `sse:access-changed`, as the main app
/// would; embedded mode (where the sets live in this process) first replaces
/// the user's devices when `devices` is given, then applies the change.
fn access_changed(gw: &Gateway, req: &Request) -> Action {
    let who = match bearer(gw, req.head) {
        Ok(w) => w,
        Err(r) => return Action::Respond(r),
    };
    if !who.admin {
        return Action::Respond(Response::error(
            403,
            "Access changes require an admin token",
        ));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        user_id: Value,
        #[serde(default)]
        devices: Option<Vec<String>>,
    }
    let parsed = serde_json::from_slice::<Body>(req.body).ok().and_then(|b| {
        let user = crate::auth::user_from_sub(&b.user_id)?;
        let devices_ok = b.devices.as_ref().is_none_or(|d| {
            d.len() <= 100_000
                && d.iter()
                    .all(|d| !d.is_empty() && d.len() <= MAX_DEVICE_ID_BYTES)
        });
        devices_ok.then_some((user, b.devices))
    });
    let Some((user, devices)) = parsed else {
        return Action::Respond(Response::error(
            400,
            "Body must be {\"userId\": \"...\", \"devices\"?: [\"...\"]}",
        ));
    };
    match (gw.store.memory(), devices) {
        (Some(memory), devices) => {
            if let Some(devices) = devices {
                memory.set_devices(&user.key, devices.into_iter().collect());
            }
            Action::Lookup(
                Job::Owned { user: user.clone() },
                Pending::AccessChanged(user),
            )
        }
        (None, Some(_)) => Action::Respond(Response::error(
            400,
            "devices can be given only in embedded mode; in Redis mode change user:<id>:devices",
        )),
        (None, None) => Action::Lookup(
            Job::Publish {
                channel: crate::bus::store::ACCESS_CHANGED_CHANNEL.into(),
                payload: user.key.as_bytes().to_vec(),
            },
            Pending::Publish,
        ),
    }
}

/// Turns a store outcome into the answer.
/// `owner` is where the answer is going: (reactor, connection key), which
/// becomes the stream's address in the registry if it opens.
pub fn resolve(
    gw: &Gateway,
    pending: Pending,
    outcome: Outcome,
    owner: (usize, usize),
) -> Resolution {
    use Resolution::Respond;
    if let Outcome::Unavailable = outcome {
        return Respond(
            Response::error(503, "Redis unavailable, try again shortly").header("Retry-After", "2"),
        );
    }
    match (pending, outcome) {
        (Pending::IssueTicket(r), Outcome::TicketStored) => Respond(r),
        (Pending::IssueTicket(_), Outcome::TooManyTickets { retry_after_secs }) => Respond(
            Response::error(
                429,
                &format!(
                    "At most {} stream tickets per minute",
                    gw.config.max_tickets_per_minute
                ),
            )
            .header("Retry-After", retry_after_secs.to_string()),
        ),
        (Pending::DeleteTicket(id), Outcome::Deleted) => {
            // This instance's streams end now; the others' (and, in Redis
            // mode, these again, harmlessly) when `sse:revoke` reaches them.
            if let Ok(ticket) = uuid::Uuid::parse_str(&id) {
                gw.hub.revoke(ticket);
            }
            Respond(Response::empty(204))
        }
        (Pending::DeleteTicket(_), Outcome::NotOwner) => {
            Respond(Response::error(403, "Not your ticket"))
        }
        (Pending::DeleteTicket(_), _) => Respond(Response::error(404, "Unknown ticket")),
        (Pending::AccessChanged(user), Outcome::Owned(owned)) => {
            let devices = owned.len();
            gw.hub.access_changed(&user, owned);
            Respond(Response::json(
                200,
                &json!({"accessChanged": true, "userId": user.to_json(), "devices": devices}),
            ))
        }
        (Pending::Status(t), Outcome::TicketAlive(true)) => Respond(status_body(gw, &t)),
        (Pending::Status(_), _) => {
            Respond(Response::error(401, "Stream ticket revoked or expired"))
        }
        (Pending::Publish, Outcome::Published) => {
            Respond(Response::json(200, &json!({"published": true})))
        }
        (Pending::Stream(s), Outcome::Facts(facts)) => {
            if !facts.ticket_alive {
                return Respond(Response::error(401, "Stream ticket revoked or expired"));
            }
            if facts.owned.iter().any(|owned| !owned) {
                return Respond(Response::error(403, "Access denied to one or more devices"));
            }
            open(gw, s, facts, owner)
        }
        _ => Respond(Response::error(500, "Unexpected store answer")),
    }
}

fn status_body(gw: &Gateway, t: &Ticket) -> Response {
    let (counts, streams) = gw.registry.of(&t.user);
    let now = epoch_ms();
    let active: Vec<Value> = streams
        .iter()
        .map(|s| {
            json!({
                "id": s.id.to_string(),
                "purpose": s.purpose.as_str(),
                "deviceCount": s.devices.len(),
                "devices": s.devices.iter().map(|d| &**d).collect::<Vec<&str>>(),
                "connectedAt": iso8601(s.connected_at_ms),
                "uptime": now.saturating_sub(s.connected_at_ms) / 1000,
            })
        })
        .collect();
    Response::json(
        200,
        &json!({
            "userId": t.user.to_json(),
            "ticketPurpose": t.purpose_name(),
            "connections": counts.to_json(),
            "limits": gw.registry.limits.to_json(),
            "activeConnections": active,
        }),
    )
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

fn open(
    gw: &Gateway,
    mut s: StreamRequest,
    facts: StreamFacts,
    owner: (usize, usize),
) -> Resolution {
    let elsewhere = facts.lease.others();
    // One copy of the device list, shared by the registry and the filter.
    let devices: Arc<[Box<str>]> = s.devices.iter().map(|d| d.as_str().into()).collect();
    let refusal = match facts.lease {
        LeaseAnswer::Refused { .. } => {
            let mut current = gw.registry.of(&s.ticket.user).0;
            current.add(s.purpose, elsewhere);
            Some(Refusal::User {
                purpose: s.purpose,
                current,
            })
        }
        _ => {
            let active = ActiveStream {
                id: s.id,
                purpose: s.purpose,
                devices: match s.purpose {
                    Purpose::Data => devices.clone(),
                    Purpose::Alerts => Arc::from(Vec::new()),
                },
                connected_at_ms: epoch_ms(),
                owner,
            };
            let opened = gw
                .registry
                .open(&s.ticket.user, s.client, active, elsewhere);
            if let (Err(_), LeaseAnswer::Granted { .. }) = (&opened, facts.lease) {
                gw.release_lease(&s.ticket.user, s.purpose, s.id);
            }
            opened.err()
        }
    };
    if let Some(refusal) = refusal {
        if s.retried {
            return Resolution::Respond(too_many(gw, refusal));
        }
        // A fresh id, so the retry's lease can never race the release above.
        s.retried = true;
        s.id = StreamId::new_v4();
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
    Resolution::Open(StreamSpec {
        id,
        ticket: s.ticket,
        purpose: s.purpose,
        filter,
        client: s.client,
        snapshot,
        last_event_id: s.last_event_id,
    })
}

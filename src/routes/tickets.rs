//! Stream tickets: minting (`POST /sse/stream-ticket`, rate limited per
//! user), deleting (`DELETE /sse/stream-ticket/<id>`, which revokes its open
//! streams), and checking a ticket for `/sse/status`.

use std::fmt::Write;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{bearer, Action, Pending, Request};
use crate::auth::ticket::Ticket;
use crate::context::Gateway;
use crate::http::head::Head;
use crate::http::query;
use crate::http::response::Response;
use crate::store::protocol::Job;
use crate::stream::frame::Purpose;
use crate::time::{epoch_ms, iso8601};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TicketBody {
    #[serde(default)]
    ttl_seconds: Option<Value>,
    #[serde(default)]
    purpose: Option<Value>,
}

pub(super) fn issue_ticket(gw: &Gateway, req: &Request) -> Action {
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
    // Written directly: the ticket is base64url and dots, the id a UUID, so
    // nothing needs escaping (a `json!` map took a dozen allocations).
    let mut body = String::with_capacity(minted.token.len() + minted.id.len() + 64);
    let _ = write!(
        body,
        r#"{{"ticket":"{}","expiresInSeconds":{ttl},"ticketId":"{}"}}"#,
        minted.token, minted.id
    );
    let response = Response::text(200, "application/json; charset=utf-8", body);
    let job = Job::PutTicket {
        id: minted.id,
        user: who.user,
        exp_secs: minted.exp,
        per_minute: gw.config.max_tickets_per_minute,
    };
    Action::Lookup(job, Pending::IssueTicket(response))
}

pub(super) fn delete_ticket(gw: &Gateway, head: &Head, raw_id: &str) -> Action {
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

pub(super) fn ticket_param(gw: &Gateway, head: &Head) -> Result<Ticket, Response> {
    let Some(raw) = query::param(&head.query, "ticket").filter(|t| !t.is_empty()) else {
        return Err(Response::error(401, "Stream authentication required"));
    };
    gw.tickets
        .verify(&raw)
        .ok_or_else(|| Response::error(401, "Invalid or expired stream ticket"))
}

pub(super) fn status_request(gw: &Gateway, head: &Head) -> Action {
    match ticket_param(gw, head) {
        Ok(t) => Action::Lookup(Job::TicketAlive { id: t.id.clone() }, Pending::Status(t)),
        Err(r) => Action::Respond(r),
    }
}

pub(super) fn status_body(gw: &Gateway, t: &Ticket) -> Response {
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

//! The HTTP API, one file per concern, reading like the contract's endpoint
//! list. [`route`] turns a parsed request into an [`Action`]: a response now,
//! or a store [`Job`] whose outcome [`resolve`] turns into a response, an open
//! stream, or a second look at a limit. Routes never touch a socket; they do
//! act on the shared state (minting tickets, taking registry slots, giving
//! leases back, publishing to the hub), which is why they take the context.
//!
//! - [`tickets`]: minting, deleting and checking stream tickets, `/sse/status`.
//! - [`streams`]: opening data and alert streams, limits and their refusals.
//! - [`admin`]: health, metrics, publishing, access changes, static files.

mod admin;
mod streams;
mod tickets;

use std::net::IpAddr;

use serde_json::json;

use crate::auth::ticket::Ticket;
use crate::auth::Identity;
use crate::config::{canonical, Config};
use crate::context::Gateway;
use crate::http::head::{Head, Method};
use crate::http::response::Response;
use crate::store::protocol::{Job, Outcome};
use crate::stream::frame::Purpose;
use crate::stream::Stream;

pub use streams::{stream_job, StreamRequest, MAX_DEVICE_ID_BYTES};

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

pub enum Resolution {
    Respond(Response),
    /// Its slot is taken: open it, sending `snapshot` (`machine-status`
    /// frames) and what it missed since `last_event_id` first.
    Open {
        stream: Box<Stream>,
        snapshot: Vec<u8>,
        last_event_id: Option<String>,
    },
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
        match crate::config::forwarded_ip(entry) {
            Some(ip) => {
                client = canonical(ip);
                if !config.is_trusted_proxy(client) {
                    return client;
                }
            }
            // Garbage in the chain: trust nothing to its left.
            None => return client,
        }
    }
    client
}

pub fn route(gw: &Gateway, req: &Request) -> Action {
    let head = req.head;
    let Some(allow) = admin::allowed(gw, &head.path) else {
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
        "/health" => respond(admin::health(gw)),
        "/metrics" => respond(admin::metrics(gw)),
        "/demo/token" => respond(Response::json(
            200,
            &json!({"token": gw.demo_token.as_deref().unwrap_or("")}),
        )),
        "/sse/stream-ticket" => tickets::issue_ticket(gw, req),
        "/sse/publish" => admin::publish(gw, req),
        "/sse/access-changed" => admin::access_changed(gw, req),
        "/sse/status" => tickets::status_request(gw, head),
        "/sse/alerts" => streams::stream_request(gw, req, Purpose::Alerts),
        "/sse/stream" => streams::stream_request(gw, req, Purpose::Data),
        path if path.starts_with("/sse/stream-ticket/") => {
            tickets::delete_ticket(gw, head, path.trim_start_matches("/sse/stream-ticket/"))
        }
        path => match admin::page(path) {
            Some(page) => respond(page),
            None => respond(Response::error(404, "Not Found")),
        },
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

/// The caller named by the `Authorization` header, or the 401 to answer.
fn bearer(gw: &Gateway, head: &Head) -> Result<Identity, Response> {
    gw.tokens
        .verify_bearer(head.authorization.as_deref())
        .ok_or_else(|| Response::error(401, "Invalid or missing access token"))
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
        // Another user's ticket is unknown to this bearer (contract §3: 204,
        // or 404): its existence is not disclosed, and it keeps working.
        (Pending::DeleteTicket(_), _) => Respond(Response::error(404, "Unknown ticket")),
        (Pending::AccessChanged(user), Outcome::Owned(owned)) => {
            let devices = owned.len();
            gw.hub.access_changed(&user, owned);
            Respond(Response::json(
                200,
                &json!({"accessChanged": true, "userId": user.to_json(), "devices": devices}),
            ))
        }
        (Pending::Status(t), Outcome::TicketAlive(true)) => Respond(tickets::status_body(gw, &t)),
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
            streams::open(gw, s, *facts, owner)
        }
        _ => Respond(Response::error(500, "Unexpected store answer")),
    }
}

//! Operators' and the main app's endpoints: `/health`, `/metrics`,
//! `POST /sse/publish`, `POST /sse/access-changed`, and the static files
//! (the browser client, the demo page).

use serde::Deserialize;
use serde_json::{json, Value};

use super::{bearer, Action, Pending, Request, MAX_DEVICE_ID_BYTES};
use crate::context::Gateway;
use crate::http::response::Response;
use crate::ingress::{Published, RedisState};
use crate::store::protocol::Job;
use crate::stream::frame::{self, Event};
use crate::time::epoch_ms;

const STATIC_CLIENT: &[u8] = include_bytes!("../../web/sse-client.js");
const DEMO_INDEX: &[u8] = include_bytes!("../../web/index.html");
const DEMO_APP: &[u8] = include_bytes!("../../web/app.js");
const DEMO_STYLE: &[u8] = include_bytes!("../../web/style.css");
const JS: &str = "text/javascript; charset=utf-8";

/// A static file: the browser client, the demo page.
pub(super) fn page(path: &str) -> Option<Response> {
    Some(match path {
        "/sse/client.js" => {
            Response::bytes(200, JS, STATIC_CLIENT).header("Cache-Control", "no-cache")
        }
        "/" | "/index.html" => Response::bytes(200, "text/html; charset=utf-8", DEMO_INDEX),
        "/app.js" => Response::bytes(200, JS, DEMO_APP),
        "/style.css" => Response::bytes(200, "text/css; charset=utf-8", DEMO_STYLE),
        _ => return None,
    })
}

pub(super) fn metrics(gw: &Gateway) -> Response {
    Response::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        gw.metrics.render(
            gw.hub.redis_state().as_str(),
            gw.hub.mailboxes().iter().map(|m| m.depth()),
        ),
    )
}

/// The methods a path answers, or None for an unknown path.
pub(super) fn allowed(gw: &Gateway, path: &str) -> Option<&'static str> {
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

pub(super) fn health(gw: &Gateway) -> Response {
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

pub(super) fn publish(gw: &Gateway, req: &Request) -> Action {
    let who = match bearer(gw, req.head) {
        Ok(w) => w,
        Err(r) => return Action::Respond(r),
    };
    if !who.admin {
        return Action::Respond(Response::error(403, "Publishing requires an admin token"));
    }
    // The message is kept as written (key order, duplicate keys), so it is
    // checked and framed exactly as the same bytes published on Redis are.
    #[derive(Deserialize)]
    struct Body<'a> {
        channel: String,
        #[serde(borrow)]
        message: &'a serde_json::value::RawValue,
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
    // A message given as a JSON string is that string's text.
    let raw = body.message.get();
    let payload = match serde_json::from_str::<String>(raw) {
        Ok(text) if raw.starts_with('"') => text.into_bytes(),
        _ => raw.as_bytes().to_vec(),
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
pub(super) fn access_changed(gw: &Gateway, req: &Request) -> Action {
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
                channel: crate::store::protocol::ACCESS_CHANGED_CHANNEL.into(),
                payload: user.key.as_bytes().to_vec(),
            },
            Pending::Publish,
        ),
    }
}

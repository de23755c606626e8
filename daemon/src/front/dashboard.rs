//! The dashboard at `/`: a page built into the binary (no CDN, no Node toolchain), the socket
//! protocol relayed at `POST /lmsd` — the page reads the same requests `lmsd-ctl` sends, so the
//! two never disagree — and lmsd's events as server-sent events at `GET /events`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmsd_proto::{parse_request, Request, WireError};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{authorize, Dialect, Front};
use crate::tasks::EventSink;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

pub(super) async fn page() -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            // Its own script and styles only: nothing from elsewhere runs in it.
            (
                "content-security-policy",
                "default-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            // Not inside another site's frame, where its clicks would be someone else's.
            ("x-frame-options", "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

pub(super) async fn script() -> Response {
    ([("content-type", "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

/// Whether the page may send `request`: what it reads, and its few actions — unload, pin and
/// unpin, cancel a task or a job. Anything else is `lmsd-ctl`'s, or the front door's APIs'.
fn allowed(request: &Request) -> bool {
    matches!(
        request,
        Request::Status
            | Request::Models
            | Request::Tasks
            | Request::Savings(_)
            | Request::Fitness(_)
            | Request::BatchStatus(_)
            | Request::Unload(_)
            | Request::Pin(_)
            | Request::Unpin(_)
            | Request::Cancel(_)
            | Request::BatchCancel(_)
    )
}

/// Whether a request comes from this page, not from another site the browser is on: another
/// site's script can send a form-like POST to a loopback port without a key (a browser lets it,
/// unseen), or reach it under a name of its own (DNS rebinding). So `/lmsd` takes JSON only
/// (which a page elsewhere cannot send without asking first), from a page of this origin, to a
/// loopback name when no key guards the door.
fn same_site(front: &Front, headers: &HeaderMap) -> Result<(), WireError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refuse = |why: &str| {
        Err(WireError::new(
            lmsd_proto::ErrorCode::PermissionDenied,
            format!("the dashboard's requests come from its own page: {why}"),
        ))
    };
    if !header("content-type").is_some_and(|t| t.starts_with("application/json")) {
        return refuse("send JSON (content-type: application/json)");
    }
    let host = header("host").unwrap_or_default();
    if let Some(origin) = header("origin") {
        let from = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if from != host {
            return refuse("from another origin");
        }
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    if front.keys.is_empty() && !["127.0.0.1", "localhost", "[::1]"].contains(&name) {
        return refuse("to a loopback name (127.0.0.1, localhost), or set [http] api_keys");
    }
    Ok(())
}

/// One socket request line, answered with its terminal reply line, by the socket's own code.
pub(super) async fn request(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(wire) = authorize(&front, &headers).and_then(|()| same_site(&front, &headers)) {
        return Dialect::OpenAi.error(wire);
    }
    let envelope = match parse_request(&body) {
        Ok(envelope) => envelope,
        Err(refused) => {
            return (StatusCode::BAD_REQUEST, Json(refused.into_reply())).into_response()
        }
    };
    if !allowed(&envelope.request) {
        return Dialect::OpenAi.error(WireError::bad_request(
            "the dashboard reads lmsd and unloads, pins and cancels; use lmsd-ctl for the rest",
        ));
    }
    // Its events (none of these requests sends any) have nowhere to go.
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: envelope.id.clone(),
        replies,
    };
    let reply = crate::server::answer(
        &front.ctx,
        envelope.id,
        &envelope.request,
        &sink,
        CancellationToken::new(),
    )
    .await;
    Json(reply).into_response()
}

/// lmsd's events as they happen, one `data:` line each, until the client goes or lmsd stops.
pub(super) async fn events(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return Dialect::OpenAi.error(wire);
    }
    let events = front.ctx.observers.events.subscribe();
    let stopping = front.ctx.stopping.clone();
    let stream =
        futures_util::stream::unfold((events, stopping), |(mut events, stopping)| async move {
            loop {
                let event = tokio::select! {
                    _ = stopping.cancelled() => return None,
                    event = events.recv() => event,
                };
                match event {
                    Ok(event) => {
                        let line = format!(
                            "data: {}\n\n",
                            serde_json::to_string(&event).unwrap_or_default()
                        );
                        return Some((Ok::<_, Infallible>(Bytes::from(line)), (events, stopping)));
                    }
                    // A page that cannot keep up misses events rather than slowing lmsd.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

//! The wire: an accept loop over hyper that keeps connections the way LM Studio's Node/Express
//! server does (Express headers, idle keep-alive sockets closed after `keepAliveTimeout`), and
//! the connection-level faults that need it (closing a reused connection, dropping a reply).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, Version};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::faults::{take_fault_where, Fault, Route};
use crate::Shared;

/// Marks a response that must not be written: the connection is closed instead, so the client
/// sees a broken connection. Also the service error that makes hyper close it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloseWithoutReply;

impl std::fmt::Display for CloseWithoutReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed without a reply (simulated)")
    }
}

impl std::error::Error for CloseWithoutReply {}

impl CloseWithoutReply {
    pub(crate) fn response() -> axum::response::Response {
        let mut response = axum::response::Response::new(Body::empty());
        response.extensions_mut().insert(CloseWithoutReply);
        response
    }
}

/// How the server is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Stop accepting; let open requests finish.
    Graceful,
    /// Stop accepting and cut every connection, as a process that quits does.
    Cut,
}

/// A listening server and its connections.
#[derive(Debug)]
pub(crate) struct Server {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

/// Binds with SO_REUSEADDR, so that LM Studio "coming back" can take its port again at once.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Server {
    pub(crate) fn spawn(listener: TcpListener, shared: Arc<Shared>, router: Router) -> Self {
        let (stop, stopped) = watch::channel(Stop::Run);
        let task = tokio::spawn(accept_loop(listener, shared, router, stopped));
        Server { stop, task }
    }

    /// Stops accepting and lets open requests finish for up to `grace`; then cuts the rest.
    pub(crate) async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(Stop::Graceful);
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    /// Stops accepting and cuts every connection; returns once the port refuses connections.
    pub(crate) async fn cut(mut self) {
        let _ = self.stop.send(Stop::Cut);
        let _ = (&mut self.task).await;
    }

    /// Stops at once, without waiting (for `Drop`): aborting the loop drops the listener and
    /// the connection tasks it owns.
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    router: Router,
    mut stop: watch::Receiver<Stop>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let serve = serve_connection(stream, shared.clone(), router.clone(), stop.clone());
                    connections.spawn(serve);
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if *stop.borrow() == Stop::Graceful {
        while connections.join_next().await.is_some() {}
    } else {
        connections.shutdown().await;
    }
}

/// One connection's requests in flight and idle clock, shared by its service and its task.
#[derive(Debug)]
struct ConnState {
    /// Requests in flight (until their response body is written or dropped), and since when
    /// the connection has had none.
    activity: Mutex<(usize, Instant)>,
    changed: Notify,
    /// Requests seen so far: a request after the first arrives on a reused connection.
    requests: AtomicU64,
    /// A graceful close has begun: responses say `Connection: close`.
    closing: AtomicBool,
}

impl ConnState {
    fn activity(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the connection will have been idle for `timeout`, if nothing is in flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        let (active, since) = *self.activity();
        (active == 0).then(|| since + timeout)
    }
}

/// Counts a request as in flight for as long as it lives.
#[derive(Debug)]
struct Active(Arc<ConnState>);

impl Active {
    fn begin(conn: &Arc<ConnState>) -> Self {
        conn.activity().0 += 1;
        conn.changed.notify_one();
        Active(conn.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        {
            let mut activity = self.0.activity();
            activity.0 = activity.0.saturating_sub(1);
            activity.1 = Instant::now();
        }
        self.0.changed.notify_one();
    }
}

/// Serves one connection, closing it once idle for the keep-alive timeout, as Node does. A
/// long response is never cut: only time with nothing in flight counts.
async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    router: Router,
    mut stop: watch::Receiver<Stop>,
) {
    let _ = stream.set_nodelay(true);
    let keep_alive = shared.lock().config.keep_alive_timeout;
    let conn = Arc::new(ConnState {
        activity: Mutex::new((0, Instant::now())),
        changed: Notify::new(),
        requests: AtomicU64::new(0),
        closing: AtomicBool::new(false),
    });
    let service = ConnService {
        router,
        shared,
        conn: conn.clone(),
        keep_alive: keep_alive_header(keep_alive),
    };
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    // Far enough never to fire: the idle branch below always needs a deadline to wait for.
    let never = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut closing = false;
    loop {
        let deadline = (!closing).then(|| conn.idle_deadline(keep_alive)).flatten();
        tokio::select! {
            _ = http.as_mut() => return,
            _ = tokio::time::sleep_until(deadline.unwrap_or(never)), if deadline.is_some() => {
                if conn.idle_deadline(keep_alive).is_some_and(|d| d <= Instant::now()) {
                    conn.closing.store(true, Ordering::Relaxed);
                    http.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = conn.changed.notified() => {}
            changed = stop.changed() => match changed {
                Ok(()) if *stop.borrow() == Stop::Graceful => {
                    if !closing {
                        conn.closing.store(true, Ordering::Relaxed);
                        http.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                Ok(()) if *stop.borrow() == Stop::Run => {}
                // Cut, or the simulator is gone: drop the connection as it stands.
                _ => return,
            },
        }
    }
}

/// `Keep-Alive: timeout=N`, N in whole seconds rounded up, as Node writes it.
fn keep_alive_header(timeout: Duration) -> HeaderValue {
    let secs = (timeout.as_secs_f64().ceil() as u64).max(1);
    HeaderValue::from_str(&format!("timeout={secs}"))
        .unwrap_or(HeaderValue::from_static("timeout=5"))
}

/// The route a path belongs to, for connection-level faults; unknown paths match `Route::Any`
/// rules only.
fn route_of(path: &str) -> Route {
    match path {
        "/api/v1/models" => Route::Models,
        "/api/v1/models/load" => Route::Load,
        "/api/v1/models/unload" => Route::Unload,
        "/api/v1/chat" => Route::Chat,
        "/v1/embeddings" => Route::Embeddings,
        _ => Route::Any,
    }
}

/// Whether the client asked for the connection to end with this request.
fn client_closes(request: &Request<Incoming>) -> bool {
    let connection = request
        .headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    connection.contains("close")
        || (request.version() == Version::HTTP_10 && !connection.contains("keep-alive"))
}

#[derive(Debug, Clone)]
struct ConnService {
    router: Router,
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    keep_alive: HeaderValue,
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, CloseWithoutReply>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = CloseWithoutReply;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let active = Active::begin(&self.conn);
        let reused = self.conn.requests.fetch_add(1, Ordering::Relaxed) > 0;
        if reused {
            let route = route_of(request.uri().path());
            let mut state = self.shared.lock();
            let close = take_fault_where(&mut state.faults, route, |f| *f == Fault::CloseReused);
            if close.is_some() {
                state.stats.closed_reused += 1;
                return Box::pin(async { Err(CloseWithoutReply) });
            }
        }
        let closes = client_closes(&request);
        let router = self.router.clone();
        let conn = self.conn.clone();
        let keep_alive = self.keep_alive.clone();
        Box::pin(async move {
            let mut response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.extensions().get::<CloseWithoutReply>().is_some() {
                return Err(CloseWithoutReply);
            }
            let headers = response.headers_mut();
            headers.insert("x-powered-by", HeaderValue::from_static("Express"));
            if closes || conn.closing.load(Ordering::Relaxed) {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            } else {
                headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
                headers.insert("keep-alive", keep_alive);
            }
            Ok(response.map(|body| TrackedBody {
                body,
                _active: active,
            }))
        })
    }
}

/// A response body that keeps its request counted as in flight until it is written or dropped,
/// so that a long stream is never taken for an idle connection.
#[derive(Debug)]
struct TrackedBody {
    body: Body,
    _active: Active,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_is_whole_seconds_rounded_up() {
        assert_eq!(keep_alive_header(Duration::from_secs(5)), "timeout=5");
        assert_eq!(keep_alive_header(Duration::from_millis(300)), "timeout=1");
        assert_eq!(keep_alive_header(Duration::from_millis(2500)), "timeout=3");
        assert_eq!(keep_alive_header(Duration::ZERO), "timeout=1");
    }
}

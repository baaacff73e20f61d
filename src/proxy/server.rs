//! Serving HTTP/1 connections under limits, for both of the proxy's ports: at most
//! `max_connections` at once (one more is answered 503 and closed), a bounded read buffer each,
//! and a clock per connection that closes it when its request head is too slow, when it has
//! stayed idle between requests too long, or when a request's bytes stopped moving. Accept
//! errors (out of file descriptors) back off and are logged at most once per interval. On stop
//! the listener closes, idle connections close, and requests in flight may finish within the
//! drain time.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// What every answer's body is.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The limits of one listener.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A request head must be complete this long after the connection opened or after the
    /// first byte of a later request.
    pub header_timeout: Duration,
    /// A connection with no request in progress closes after this long.
    pub keep_alive_timeout: Duration,
    /// A connection with a request in progress closes when no byte moved for this long.
    pub stall_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// The read buffer's bound (and so the largest request head).
    pub max_header_bytes: usize,
    /// How long requests in flight may finish after stop.
    pub drain_timeout: Duration,
    /// Close each connection after its answer (the activity port: nobody keeps a place there).
    pub one_request_per_connection: bool,
}

/// Where a connection is, which decides when it is closed if nothing happens.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Waiting for a request head whose first byte (or the connection) came at `since`.
    Head { since: Instant },
    /// Serving `requests` requests; bytes last moved at `last_io`.
    Busy { requests: u32 },
    /// Between requests since `since`.
    Idle { since: Instant },
}

#[derive(Debug)]
struct ClockState {
    phase: Phase,
    last_io: Instant,
}

/// One connection's clock, moved by its reads and writes and by its requests.
#[derive(Debug)]
pub struct ConnectionClock {
    state: Mutex<ClockState>,
    /// Told when the phase changes in a way that can bring the closing time forward.
    earlier: Notify,
}

impl ConnectionClock {
    fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(ClockState {
                phase: Phase::Head { since: now },
                last_io: now,
            }),
            earlier: Notify::new(),
        }
    }

    fn read(&self, now: Instant) {
        let mut state = self.state.lock().expect("clock lock");
        state.last_io = now;
        if let Phase::Idle { .. } = state.phase {
            state.phase = Phase::Head { since: now };
            self.earlier.notify_one();
        }
    }

    fn wrote(&self, now: Instant) {
        self.state.lock().expect("clock lock").last_io = now;
    }

    fn begin_request(&self) {
        let mut state = self.state.lock().expect("clock lock");
        state.phase = match state.phase {
            Phase::Busy { requests } => Phase::Busy { requests: requests + 1 },
            _ => Phase::Busy { requests: 1 },
        };
    }

    fn end_request(&self, now: Instant) {
        let mut state = self.state.lock().expect("clock lock");
        state.last_io = now;
        state.phase = match state.phase {
            Phase::Busy { requests } if requests > 1 => Phase::Busy { requests: requests - 1 },
            _ => {
                self.earlier.notify_one();
                Phase::Idle { since: now }
            }
        };
    }

    /// Whether a request is being served (its answer has not passed completely).
    fn serving(&self) -> bool {
        matches!(self.state.lock().expect("clock lock").phase, Phase::Busy { .. })
    }

    /// When the connection is closed unless something happens first.
    fn close_at(&self, limits: &ServerLimits) -> Instant {
        let state = self.state.lock().expect("clock lock");
        match state.phase {
            Phase::Head { since } => since + limits.header_timeout,
            Phase::Idle { since } => since + limits.keep_alive_timeout,
            Phase::Busy { .. } => state.last_io + limits.stall_timeout,
        }
    }
}

/// Marks a request in progress on its connection until dropped (with the answer's body).
struct RequestMark(Arc<ConnectionClock>);

impl Drop for RequestMark {
    fn drop(&mut self) {
        self.0.end_request(Instant::now());
    }
}

/// The connection's socket, telling its clock when bytes move.
struct Watched {
    stream: TcpStream,
    clock: Arc<ConnectionClock>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read(Instant::now());
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote(Instant::now());
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote(Instant::now());
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// At most one log line per interval for a repeated condition, with how many were left out.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    left_out: u64,
}

impl Throttle {
    /// A throttle writing at most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            left_out: 0,
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + self.every) {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

/// The first pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// What a connection over the limit is told before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 33\r\n\r\ntoo many connections to the proxy";

/// Serves `listener` with `handler` until `stop` turns true, then drains. `name` tells the
/// two ports apart in logs.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    limits: ServerLimits,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut accept_errors = Throttle::new(Duration::from_secs(10));
    let mut refusals = Throttle::new(Duration::from_secs(10));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(err) => {
                if let Some(left_out) = accept_errors.allow(Instant::now()) {
                    warn!(port = name, error = %err, left_out, retry_in = ?backoff, "accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(left_out) = refusals.allow(Instant::now()) {
                warn!(
                    port = name,
                    limit = limits.max_connections,
                    left_out,
                    "connection refused: too many open connections"
                );
            }
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (handler, limits, drain) = (handler.clone(), limits.clone(), stop.clone());
        tokio::spawn(async move {
            connection(stream, peer, handler, &limits, drain).await;
            drop(permit);
        });
    }
    drop(listener);
    let open = limits.max_connections - permits.available_permits();
    if open > 0 {
        info!(port = name, open, drain = ?limits.drain_timeout, "stopped accepting; letting requests in flight finish");
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all))
        .await
        .is_err()
    {
        let open = limits.max_connections - permits.available_permits();
        warn!(
            port = name,
            open, "drain time over: closing connections with requests still in flight"
        );
    }
}

async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: H,
    limits: &ServerLimits,
    mut drain: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let clock = Arc::new(ConnectionClock::new(Instant::now()));
    let io = TokioIo::new(Watched {
        stream,
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |request| {
        service_clock.begin_request();
        let mark = RequestMark(service_clock.clone());
        let answer = handler(request, peer);
        async move {
            let response = answer.await;
            // The request is in progress until its answer's body has passed or is dropped.
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _in_progress = &mark;
                    frame
                })
                .boxed()
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(!limits.one_request_per_connection);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let close_at = clock.close_at(limits);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(err) = ended {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(close_at) => {
                if clock.close_at(limits) <= Instant::now() {
                    debug!(%peer, "closing a connection past its timeout");
                    return;
                }
            }
            _ = clock.earlier.notified() => {}
            _ = drain.wait_for(|stop| *stop), if !draining => {
                // A connection with no request being served (idle, or a head still coming)
                // closes now; one with a request in flight after its answer.
                if !clock.serving() {
                    return;
                }
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(600),
            max_connections: 4,
            max_header_bytes: 8192,
            drain_timeout: Duration::from_secs(1),
            one_request_per_connection: false,
        }
    }

    #[test]
    fn a_connection_closes_when_its_phase_has_lasted_too_long() {
        let limits = limits();
        let t0 = Instant::now();
        let clock = ConnectionClock::new(t0);
        assert_eq!(
            clock.close_at(&limits),
            t0 + limits.header_timeout,
            "a new connection owes a head"
        );
        clock.read(t0 + Duration::from_secs(3));
        assert_eq!(
            clock.close_at(&limits),
            t0 + limits.header_timeout,
            "bytes of the head do not extend it"
        );
        clock.begin_request();
        clock.wrote(t0 + Duration::from_secs(5));
        assert_eq!(
            clock.close_at(&limits),
            t0 + Duration::from_secs(5) + limits.stall_timeout,
            "a request in progress lasts while bytes move"
        );
        clock.begin_request();
        clock.end_request(t0 + Duration::from_secs(6));
        assert!(matches!(clock.state.lock().unwrap().phase, Phase::Busy { requests: 1 }));
        clock.end_request(t0 + Duration::from_secs(7));
        assert_eq!(
            clock.close_at(&limits),
            t0 + Duration::from_secs(7) + limits.keep_alive_timeout,
            "idle between requests"
        );
        clock.read(t0 + Duration::from_secs(20));
        assert_eq!(
            clock.close_at(&limits),
            t0 + Duration::from_secs(20) + limits.header_timeout,
            "the next head started"
        );
    }

    #[test]
    fn the_busy_answer_says_its_own_length() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{text}");
    }

    #[test]
    fn a_throttle_writes_once_per_interval_and_counts_what_it_left_out() {
        let mut throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.allow(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(throttle.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.allow(t0 + Duration::from_secs(10)), Some(1000));
    }
}

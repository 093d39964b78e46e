//! `serve --metrics HOST:PORT`: Prometheus metrics at `/metrics`.
//!
//! The counters live where the facts are decided, once for every model:
//! the connection core counts a connection when it starts, its bytes as
//! they move and its end with the reason (`conn::End`); the UDP service
//! counts datagrams; the lifecycle sets the drain state. Counting costs an
//! atomic add on a handle each connection keeps, so the registry's lock is
//! taken once per connection, never per read.
//!
//! The encoding is prometheus-client's (the Prometheus project's Rust
//! client); the HTTP side is hyper's, with a deadline on every request and
//! a task per connection (see [`serve`]), and `/healthz` beside
//! `/metrics` for load balancers and probes.

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub mod workers;

/// What a scrape is answered with: the OpenMetrics text of this process,
/// or (a supervisor of `--processes`) of all its workers.
pub type Source = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// This process's own metrics, as a [`Source`].
pub fn own() -> Source {
    std::sync::Arc::new(|| global().encode())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Listener {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Closed {
    listener: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Datagrams {
    outcome: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    accepted: Family<Listener, Counter>,
    open: Family<Listener, Gauge>,
    closed: Family<Closed, Counter>,
    bytes_in: Family<Listener, Counter>,
    bytes_out: Family<Listener, Counter>,
    datagrams: Family<Datagrams, Counter>,
    max_conns_reached: Counter,
    draining: Gauge,
    /// Connections accepted on every listener, for the log line a worker of
    /// `--processes` ends with (how evenly the kernel spread them).
    accepted_all: std::sync::atomic::AtomicU64,
    /// The handles of each listener, made at its first connection.
    listeners: std::sync::Mutex<std::collections::HashMap<String, ConnMetrics>>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, labelled with the model that serves (the first
/// call decides it; the core's unit tests get "none").
pub fn init(model: &str) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(model))
}

pub fn global() -> &'static Metrics {
    init("none")
}

/// What the connections of one listener count with: handles, so that
/// counting bytes takes no lock. Shared by all of them, so that a held
/// connection carries one pointer, not a label and two counters.
pub struct ListenerCounters {
    listener: String,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

/// What one connection counts with.
pub type ConnMetrics = std::sync::Arc<ListenerCounters>;

impl Metrics {
    fn new(model: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            "upcase",
            [(
                std::borrow::Cow::Borrowed("model"),
                std::borrow::Cow::Owned(model.to_string()),
            )]
            .into_iter(),
        );
        let m = Metrics {
            registry: Registry::default(),
            accepted: Family::default(),
            open: Family::default(),
            closed: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            datagrams: Family::default(),
            max_conns_reached: Counter::default(),
            draining: Gauge::default(),
            accepted_all: Default::default(),
            listeners: Default::default(),
        };
        registry.register(
            "connections_accepted",
            "Connections accepted, by listener",
            m.accepted.clone(),
        );
        registry.register(
            "connections_open",
            "Connections being served now, by listener",
            m.open.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by listener and reason (done, error, idle, invalid input, framing error)",
            m.closed.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes read from clients",
            m.bytes_in.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes written to clients",
            m.bytes_out.clone(),
        );
        registry.register(
            "datagrams",
            "UDP datagrams: received, answered, failed (the send failed), refused (--udp-limit, --udp-allow)",
            m.datagrams.clone(),
        );
        registry.register(
            "max_conns_reached",
            "Times accepting paused at --max-conns (new clients wait in the backlog)",
            m.max_conns_reached.clone(),
        );
        registry.register(
            "draining",
            "1 while draining after SIGTERM/SIGINT: no new connections, the open ones finish",
            m.draining.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A connection starts on `listener`.
    pub fn conn_started(&self, listener: &str) -> ConnMetrics {
        let key = Listener {
            listener: listener.to_string(),
        };
        self.accepted.get_or_create(&key).inc();
        self.accepted_all
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open.get_or_create(&key).inc();
        let mut known = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        known
            .entry(key.listener)
            .or_insert_with_key(|listener| {
                let key = Listener {
                    listener: listener.clone(),
                };
                std::sync::Arc::new(ListenerCounters {
                    bytes_in: self.bytes_in.get_or_create(&key).clone(),
                    bytes_out: self.bytes_out.get_or_create(&key).clone(),
                    listener: key.listener,
                })
            })
            .clone()
    }

    /// Connections accepted so far, on every listener.
    pub fn accepted_total(&self) -> u64 {
        self.accepted_all.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A connection ended, for `reason` (`conn::End::as_str`: the core
    /// names its reasons, the metrics only count them).
    pub fn conn_ended(&self, conn: &ConnMetrics, reason: &str) {
        let key = Listener {
            listener: conn.listener.clone(),
        };
        self.open.get_or_create(&key).dec();
        self.closed
            .get_or_create(&Closed {
                listener: key.listener,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// One UDP datagram: "received", "answered", "failed" or "refused".
    pub fn datagram(&self, outcome: &'static str) {
        self.datagrams
            .get_or_create(&Datagrams {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn max_conns_reached(&self) {
        self.max_conns_reached.inc();
    }

    pub fn set_draining(&self) {
        self.draining.set(1);
    }

    /// The OpenMetrics text (what Prometheus asks for first).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The same samples in Prometheus's older text format (0.0.4), for the
/// scrapers and tools that ask for it or for nothing in particular (curl,
/// promtool): there a counter's HELP and TYPE name the `_total` sample
/// itself, and there is no `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{kind}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Whether this process is draining (for `/healthz`): set with the drain
/// gauge by the lifecycle, and by a supervisor when it stops.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Marks the process as draining: `/healthz` answers 503 from now on.
pub fn set_draining() {
    DRAINING.store(true, Ordering::Relaxed);
    global().set_draining();
}

/// Wakes the accept loop to stop (see [`stop_serving`]).
static STOP: OnceLock<tokio::sync::Notify> = OnceLock::new();

/// Stops answering scrapes in this process (a supervisor that handed its
/// metrics port to its successor and stays in the foreground).
pub fn stop_serving() {
    STOP.get_or_init(tokio::sync::Notify::new).notify_one();
}

/// Scrapes served at once; more are closed at once rather than queued
/// behind the slow ones.
const MAX_SCRAPERS: usize = 64;
/// The whole of a request (head and answer) must be done within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The request's head must have arrived within this.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `GET /metrics` (Prometheus) and `GET /healthz` (200 while
/// serving, 503 once draining: what HAProxy's `option httpchk`, systemd
/// and Kubernetes probes ask) on `listener`, from `source`.
///
/// hyper on a runtime of its own, on a thread of its own (whatever the
/// model: the fork model's loop, a blocking thread per client, must not
/// be the one that answers scrapes). Every connection is a task with a
/// whole-request deadline, so a client that drips its request or never
/// sends one delays no other scrape; at most [`MAX_SCRAPERS`] at once.
pub fn serve(listener: TcpListener, source: Source) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("upcase-metrics".into())
        .spawn(move || rt.block_on(accept_loop(listener, source)))
        .map(|_| ())
}

async fn accept_loop(listener: TcpListener, source: Source) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    let stop = STOP.get_or_init(tokio::sync::Notify::new);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.notified() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("metrics: {MAX_SCRAPERS} scrapes at once: closing another");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| answer(req, source.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(REQUEST_DEADLINE, conn).await {
                Ok(Err(e)) => tracing::debug!("metrics: {e}"),
                Err(_) => tracing::debug!("metrics: a request took over {REQUEST_DEADLINE:?}"),
                Ok(Ok(())) => {}
            }
        });
    }
    // Stopped: the scrapes already taken are answered, not cut.
    drop(listener);
    let all = MAX_SCRAPERS as u32;
    let _ = tokio::time::timeout(REQUEST_DEADLINE, permits.acquire_many(all)).await;
    tracing::info!("metrics: no longer answered by this process; the next server answers");
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: u16, kind: &str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::from(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    source: Source,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Ok(reply(405, TEXT, "GET /metrics or /healthz\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                });
            // A supervisor's source asks its workers: off the runtime.
            let text = tokio::task::spawn_blocking(move || source())
                .await
                .unwrap_or_default();
            if openmetrics {
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                reply(200, kind, text)
            } else {
                let kind = "text/plain; version=0.0.4; charset=utf-8";
                reply(200, kind, prometheus_text(&text))
            }
        }
        "/healthz" if DRAINING.load(Ordering::Relaxed) => reply(503, TEXT, "draining\n".into()),
        "/healthz" => reply(200, TEXT, "ok\n".into()),
        _ => reply(404, TEXT, "upcase serves /metrics and /healthz\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_the_total_samples() {
        let m = Metrics::new("epoll");
        m.conn_started("tcp://127.0.0.1:1").bytes_in.inc_by(5);
        let om = m.encode();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE upcase_received_bytes counter"), "{om}");
        let text = prometheus_text(&om);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE upcase_received_bytes_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP upcase_received_bytes_total Bytes read"),
            "{text}"
        );
        assert!(
            text.contains(
                "upcase_received_bytes_total{model=\"epoll\",listener=\"tcp://127.0.0.1:1\"} 5"
            ),
            "{text}"
        );
        // Gauges keep their names.
        assert!(text.contains("# TYPE upcase_draining gauge"), "{text}");
    }
}

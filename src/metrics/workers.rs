//! `--metrics` with `--processes`: one scrape, every worker.
//!
//! Each worker counts its own connections, in its own memory, and one port
//! cannot be served by them all (a scrape would reach whichever worker the
//! kernel woke). So the supervisor serves the port, and on each scrape asks
//! every worker for its text over a socket pair made when the worker was
//! started ([`Channels`]), then merges them: every sample gets a `worker`
//! label, the way Prometheus expects several processes of one job to be
//! told apart (sum them with `sum without (worker)`). A worker that is
//! restarted starts its counters at zero: a counter reset, which
//! Prometheus's `rate()` already handles.
//!
//! The protocol is the least that works: the supervisor writes one byte,
//! the worker answers with the text's length (4 bytes, little-endian) and
//! the text.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest text a worker may answer with.
const MAX_TEXT: usize = 16 << 20;
/// How long a worker may take to answer a scrape.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// The supervisor's end of each worker's channel, by worker number, and
/// what only the supervisor knows: how many workers there should be, how
/// many are ready, and how many were started again after they died.
#[derive(Clone, Default)]
pub struct Channels {
    chans: Arc<Mutex<BTreeMap<usize, UnixStream>>>,
    workers: Arc<Workers>,
}

#[derive(Default)]
struct Workers {
    wanted: AtomicU64,
    ready: AtomicU64,
    restarts: AtomicU64,
}

impl Channels {
    /// Worker `n` (started again, or for the first time) answers on `chan`.
    pub fn set(&self, n: usize, chan: UnixStream) {
        self.lock().insert(n, chan);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, UnixStream>> {
        self.chans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The supervisor's count of its workers: `wanted` (--processes) and
    /// `ready` now.
    pub fn set_workers(&self, wanted: usize, ready: usize) {
        self.workers.wanted.store(wanted as u64, Ordering::Relaxed);
        self.workers.ready.store(ready as u64, Ordering::Relaxed);
    }

    /// A worker died and is started again.
    pub fn worker_restarted(&self) {
        self.workers.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The supervisor's own families, then every worker's text, merged. A
    /// worker that does not answer (it just died, or is stuck) is left out
    /// of this scrape and logged; the supervisor's count of ready workers
    /// says so even then, and before the first worker has started.
    pub fn scrape(&self) -> String {
        let mut parts = Vec::new();
        for (&n, chan) in self.lock().iter_mut() {
            match ask(chan) {
                Ok(text) => parts.push((n, text)),
                Err(e) => tracing::debug!("metrics: worker {n} did not answer: {e}"),
            }
        }
        let w = &self.workers;
        format!(
            "# HELP upcase_workers Worker processes (--processes): wanted, and ready now\n\
             # TYPE upcase_workers gauge\n\
             upcase_workers{{state=\"wanted\"}} {}\n\
             upcase_workers{{state=\"ready\"}} {}\n\
             # HELP upcase_worker_restarts Workers started again after they died\n\
             # TYPE upcase_worker_restarts counter\n\
             upcase_worker_restarts_total {}\n{}",
            w.wanted.load(Ordering::Relaxed),
            w.ready.load(Ordering::Relaxed),
            w.restarts.load(Ordering::Relaxed),
            merge(&parts)
        )
    }

    /// As a [`super::Source`], for the supervisor's metrics port.
    pub fn source(&self) -> super::Source {
        let me = self.clone();
        Arc::new(move || me.scrape())
    }
}

fn ask(chan: &mut UnixStream) -> io::Result<String> {
    chan.set_read_timeout(Some(ANSWER_WITHIN))?;
    chan.set_write_timeout(Some(ANSWER_WITHIN))?;
    chan.write_all(b"?")?;
    let mut len = [0u8; 4];
    chan.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_TEXT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes of metrics"),
        ));
    }
    let mut text = vec![0u8; len];
    chan.read_exact(&mut text)?;
    String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// In a worker: answers the supervisor's scrapes on `chan` with this
/// process's metrics, on a thread of its own, until the supervisor is gone.
pub fn answer(mut chan: UnixStream) -> io::Result<()> {
    std::thread::Builder::new()
        .name("upcase-metrics".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            while matches!(chan.read(&mut byte), Ok(1)) {
                let text = super::global().encode();
                let len = (text.len() as u32).to_le_bytes();
                if chan
                    .write_all(&len)
                    .and_then(|()| chan.write_all(text.as_bytes()))
                    .is_err()
                {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// The workers' OpenMetrics texts as one: each family once, in the order
/// first seen, with every worker's samples, each labelled with its worker.
pub fn merge(parts: &[(usize, String)]) -> String {
    // (family name, its HELP/TYPE/UNIT lines, its samples)
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (worker, text) in parts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.split(' ').nth(1).unwrap_or_default();
                let i = match families.iter().position(|f| f.0 == name) {
                    Some(i) => i,
                    None => {
                        families.push((name.to_string(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if !families[i].1.iter().any(|h| h == line) && families[i].2.is_empty() {
                    families[i].1.push(line.to_string());
                }
                current = Some(i);
            } else if let Some(i) = current {
                families[i].2.push(labelled(line, *worker));
            }
        }
    }
    let mut out = String::new();
    for (_, head, samples) in families {
        for l in head.iter().chain(&samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// `name{a="b"} 1` becomes `name{worker="N",a="b"} 1`.
fn labelled(sample: &str, worker: usize) -> String {
    let label = format!("worker=\"{worker}\"");
    match sample.find(['{', ' ']) {
        Some(i) if sample[i..].starts_with("{}") => {
            format!("{}{{{label}}}{}", &sample[..i], &sample[i + 2..])
        }
        Some(i) if sample[i..].starts_with('{') => {
            format!("{}{{{label},{}", &sample[..i], &sample[i + 1..])
        }
        Some(i) => format!("{}{{{label}}}{}", &sample[..i], &sample[i..]),
        None => sample.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_is_labelled_with_its_worker_and_families_stay_whole() {
        let one = "# HELP up_total Up.\n# TYPE up_total counter\nup_total{model=\"epoll\"} 3\n# HELP d Draining.\n# TYPE d gauge\nd 0\n# EOF\n";
        let two = "# HELP up_total Up.\n# TYPE up_total counter\nup_total{model=\"epoll\"} 4\n# HELP d Draining.\n# TYPE d gauge\nd{} 1\n# EOF\n";
        let merged = merge(&[(1, one.to_string()), (2, two.to_string())]);
        assert_eq!(
            merged,
            "# HELP up_total Up.\n# TYPE up_total counter\n\
             up_total{worker=\"1\",model=\"epoll\"} 3\n\
             up_total{worker=\"2\",model=\"epoll\"} 4\n\
             # HELP d Draining.\n# TYPE d gauge\n\
             d{worker=\"1\"} 0\nd{worker=\"2\"} 1\n# EOF\n"
        );
        assert_eq!(merge(&[]), "# EOF\n");
    }

    #[test]
    fn a_worker_answers_over_its_channel() {
        let (mut sup, worker) = UnixStream::pair().unwrap();
        answer(worker).unwrap();
        let text = ask(&mut sup).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let again = ask(&mut sup).unwrap();
        assert!(again.contains("# TYPE"), "{again}");
    }
}

//! The UDP client: the textbook's answer to loss.
//!
//! UDP has no flow control and no delivery guarantee, so each request waits
//! for its reply with a timeout; on silence it resends and doubles the wait
//! (exponential backoff, so a congested server is not flooded), and after
//! `--retries` resends the request is counted as lost. A reply to an earlier
//! attempt that arrives late is recognised and skipped, not taken for the
//! current answer: in `--bytes` mode each datagram starts with its sequence
//! number in uppercase hex, which the transform leaves as it is.

use std::io::{self, BufRead, Write};
use std::net::UdpSocket;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::{Outcome, SendConfig, UdpRetry};
use crate::net;
use crate::pattern::Pattern;
use crate::transform;

/// Counts kept over a run; printed as the loss report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct UdpReport {
    /// Requests made (each counted once, however often it was resent).
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub wrong: u64,
    /// Extra transmissions after a timeout.
    pub resent: u64,
    /// Replies to an earlier attempt that arrived after we moved on.
    pub late: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub datagrams_per_s: f64,
}

impl UdpReport {
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("plain struct"));
            return;
        }
        println!("sent:        {} datagrams", self.sent);
        println!("answered:    {}", self.answered);
        println!("lost:        {}", self.lost);
        println!("wrong:       {}", self.wrong);
        println!("resent:      {}", self.resent);
        println!("late:        {}", self.late);
        println!("seconds:     {:.3}", self.seconds);
        println!("datagrams/s: {:.1}", self.datagrams_per_s);
    }

    fn outcome(&self) -> Outcome {
        if self.lost > 0 || self.wrong > 0 {
            Outcome::Mismatch
        } else {
            Outcome::Ok
        }
    }
}

/// How a received datagram relates to the request in flight.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer to this request.
    Good,
    /// An answer to an earlier request or attempt.
    Late,
    /// Neither: the server got it wrong.
    Wrong,
}

/// What came of one request.
#[derive(Debug)]
pub enum Answer {
    Good(Vec<u8>),
    Wrong(Vec<u8>),
    Lost,
}

/// A connected UDP socket that makes requests with timeouts and retries.
pub struct Requester {
    sock: UdpSocket,
    retry: UdpRetry,
    buf: Vec<u8>,
    lost_in_a_row: u32,
    pub report: UdpReport,
}

impl Requester {
    pub fn connect(cfg: &SendConfig) -> anyhow::Result<Self> {
        Ok(Requester {
            sock: net::connect_udp(&cfg.endpoint, &cfg.sockopts)?,
            retry: cfg.udp,
            buf: vec![0u8; 65_536],
            lost_in_a_row: 0,
            report: UdpReport::default(),
        })
    }

    /// Sends `payload` and waits for the reply `classify` accepts, resending
    /// with exponential backoff. A refused port (ICMP unreachable) is an
    /// error: nobody listens there.
    pub fn request(
        &mut self,
        payload: &[u8],
        classify: impl Fn(&[u8]) -> Reply,
    ) -> io::Result<Answer> {
        self.report.sent += 1;
        let mut wait = self.retry.timeout;
        let give_up = self.retry.total.and_then(|t| Instant::now().checked_add(t));
        for attempt in 0..=self.retry.retries {
            if attempt > 0 {
                if give_up.is_some_and(|g| Instant::now() >= g) {
                    break;
                }
                self.report.resent += 1;
            }
            self.sock.send(payload)?;
            let mut deadline = Instant::now() + wait;
            if let Some(g) = give_up {
                deadline = deadline.min(g);
            }
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if left.is_zero() {
                    break;
                }
                self.sock.set_read_timeout(Some(left))?;
                let n = match self.sock.recv(&mut self.buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let reply = &self.buf[..n];
                self.lost_in_a_row = 0;
                match classify(reply) {
                    Reply::Good => {
                        self.report.answered += 1;
                        self.report.bytes += n as u64;
                        return Ok(Answer::Good(reply.to_vec()));
                    }
                    Reply::Late => self.report.late += 1,
                    Reply::Wrong => {
                        self.report.wrong += 1;
                        return Ok(Answer::Wrong(reply.to_vec()));
                    }
                }
            }
            wait = wait.saturating_mul(2);
        }
        self.report.lost += 1;
        self.lost_in_a_row += 1;
        Ok(Answer::Lost)
    }

    /// `--deadline` has passed since `start`. Says so on stderr.
    pub fn out_of_time(&self, start: Instant) -> bool {
        let over = self.retry.deadline.is_some_and(|d| start.elapsed() >= d);
        if over {
            eprintln!("upcase: --deadline reached: stopping");
        }
        over
    }

    /// The server looks gone: `--give-up-after` requests in a row were lost.
    /// Says so on stderr.
    pub fn gave_up(&self) -> bool {
        let n = self.retry.give_up_after;
        let gone = n > 0 && self.lost_in_a_row >= n;
        if gone {
            eprintln!(
                "upcase: {n} datagrams in a row got no reply: giving up (is the server up? see --give-up-after)"
            );
        }
        gone
    }

    /// Sends one datagram without waiting (the seeds' empty goodbye).
    pub fn send_only(&self, payload: &[u8]) -> io::Result<()> {
        self.sock.send(payload).map(|_| ())
    }
}

/// `upcase send udp://...`: each stdin line is one datagram; each reply is
/// printed as a line.
pub fn send_lines(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    let mut req = Requester::connect(cfg)?;
    let start = Instant::now();
    let mut out = io::stdout().lock();
    let mut recent: Vec<Vec<u8>> = Vec::new();
    for (i, line) in io::stdin().lock().split(b'\n').enumerate() {
        let mut line = line.context("reading stdin")?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let expect = expected(cfg.mode, &line);
        let answer = req
            .request(&line, |r| classify_line(r, &expect, &recent))
            .map_err(|e| request_error(cfg, e))?;
        match answer {
            Answer::Good(r) | Answer::Wrong(r) => {
                out.write_all(&r).context("writing to stdout")?;
                out.write_all(b"\n").context("writing to stdout")?;
                out.flush().context("writing to stdout")?;
            }
            Answer::Lost => {
                eprintln!(
                    "upcase: line {}: no reply after {} tries: is the server up?",
                    i + 1,
                    cfg.udp.retries + 1
                );
                if req.gave_up() {
                    break;
                }
            }
        }
        if req.out_of_time(start) {
            break;
        }
        // Remember a few answers, to recognise late duplicates of them.
        recent.push(expect);
        if recent.len() > 16 {
            recent.remove(0);
        }
    }
    finish(&mut req.report, start);
    if req.report.lost + req.report.wrong + req.report.resent > 0 || cfg.json {
        if cfg.json {
            req.report.print(true);
        } else {
            let r = &req.report;
            eprintln!(
                "upcase: {} sent, {} answered, {} lost, {} wrong, {} resent",
                r.sent, r.answered, r.lost, r.wrong, r.resent
            );
        }
    }
    Ok(req.report.outcome())
}

/// A refused port (ICMP port unreachable) means no server listens there.
pub fn request_error(cfg: &SendConfig, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        net::NetError::Refused {
            endpoint: cfg.endpoint.clone(),
        }
        .into()
    } else {
        anyhow::Error::new(e).context(format!("udp request to {}", cfg.endpoint))
    }
}

fn classify_line(reply: &[u8], expect: &[u8], recent: &[Vec<u8>]) -> Reply {
    if reply == expect {
        Reply::Good
    } else if recent.iter().any(|r| r == reply) {
        Reply::Late
    } else {
        Reply::Wrong
    }
}

/// `upcase send udp://... --bytes N --size B`: ceil(N/B) datagrams, one at a
/// time, each verified; prints the loss report.
pub fn send_bytes(cfg: &SendConfig, total: u64) -> anyhow::Result<Outcome> {
    let mut req = Requester::connect(cfg)?;
    let size = cfg.size as u64;
    let body = Pattern::plain();
    let start = Instant::now();
    let mut offset = 0u64;
    let mut seq = 0u64;
    while offset < total {
        let len = (total - offset).min(size) as usize;
        let datagram = numbered(seq, len, &body);
        let expect = expected(cfg.mode, &datagram);
        let header = header_len(len);
        req.request(&datagram, |r| {
            if r == expect.as_slice() {
                Reply::Good
            } else if r.len() >= header && r[..header] != expect[..header] {
                Reply::Late
            } else {
                Reply::Wrong
            }
        })
        .map_err(|e| request_error(cfg, e))?;
        offset += len as u64;
        seq += 1;
        if req.gave_up() || (offset < total && req.out_of_time(start)) {
            break;
        }
    }
    let cut_short = offset < total;
    finish(&mut req.report, start);
    req.report.print(cfg.json);
    let mut outcome = req.report.outcome();
    if cut_short && outcome == Outcome::Ok {
        eprintln!("upcase: incomplete: {offset} of {total} bytes sent");
        outcome = Outcome::Mismatch;
    }
    if outcome != Outcome::Ok {
        eprintln!(
            "upcase: {} of {} datagrams lost, {} wrong",
            req.report.lost, req.report.sent, req.report.wrong
        );
    }
    Ok(outcome)
}

/// What the server must answer to `request`. Invalid UTF-8 in a request
/// is expected back unchanged (the lenient server's answer).
pub fn expected(mode: crate::transform::Mode, request: &[u8]) -> Vec<u8> {
    let lenient = match mode {
        crate::transform::Mode::Utf8 { .. } => crate::transform::Mode::Utf8 { strict: false },
        m => m,
    };
    transform::apply(lenient, request).unwrap_or_else(|_| request.to_vec())
}

fn finish(report: &mut UdpReport, start: Instant) {
    report.seconds = start.elapsed().as_secs_f64();
    report.datagrams_per_s = if report.seconds > 0.0 {
        report.answered as f64 / report.seconds
    } else {
        0.0
    };
}

/// Up to 16 uppercase hex digits of the sequence number lead the datagram.
fn header_len(len: usize) -> usize {
    len.min(16)
}

/// Datagram `seq` of `len` bytes: its number, then the seeds' message.
pub fn numbered(seq: u64, len: usize, body: &Pattern) -> Vec<u8> {
    let h = header_len(len);
    let hex = format!("{seq:016X}");
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&hex.as_bytes()[16 - h..]);
    d.extend_from_slice(body.slice(0, len - h));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_datagrams_survive_the_transform() {
        let body = Pattern::plain();
        let d = numbered(0xAB, 40, &body);
        assert_eq!(&d[..16], b"00000000000000AB");
        assert_eq!(&d[16..32], b"capitalize this!");
        let up = transform::upper(&d);
        assert_eq!(&up[..16], &d[..16], "the header is invariant");
        assert_eq!(numbered(5, 3, &body), b"005");
    }
}

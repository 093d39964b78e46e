//! `upcase chat ADDR`: the seeds' interactive client1.py (TCP) and
//! client2.py (UDP).
//!
//! Prompt `Input: `, send the line, print `Output: ...`, stop on an empty
//! line. Over a stream (the default) it does what the seed does: one
//! `recv`, and shows what it returned, so "it depends" can be seen (a
//! reply in two reads shows in two outputs). With `--framing` it sends each
//! line as one message and shows one reply message per line. Over UDP it
//! uses the retrying requester and, as client2.py does, says goodbye with an
//! empty datagram.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};

use anyhow::Context;

use super::udp::{Answer, Reply, Requester};
use super::{Outcome, SendConfig};
use crate::addr::Endpoint;
use crate::framing::{self, Decoder, Framing};
use crate::net;

pub fn run(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    if let Endpoint::Udp(_) = cfg.endpoint {
        return run_udp(cfg);
    }
    let mut sock = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    let mut decoder = Decoder::new(cfg.framing);
    let mut replies: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = || {
        format!(
            "reading the reply from {} (did the server close?)",
            cfg.endpoint
        )
    };
    while let Some(line) = prompt()? {
        let mut msg = Vec::new();
        match cfg.framing {
            Framing::Stream => msg = line,
            Framing::Line(_) => {
                msg = line;
                msg.push(b'\n');
            }
            Framing::Fixed(n) => {
                // As tcp_sixteen.py: exactly n bytes, padded or cut.
                let mut m = line;
                m.resize(n, b' ');
                msg = m;
            }
            f => framing::encode(f, &line, &mut msg),
        }
        sock.write_all(&msg)
            .with_context(|| format!("sending to {}", cfg.endpoint))?;
        if cfg.framing.is_stream() {
            // The seed's one recv: whatever this read returns.
            let n = sock.read(&mut buf).with_context(closed)?;
            if n == 0 {
                anyhow::bail!("{}", closed());
            }
            output(&buf[..n])?;
            continue;
        }
        while replies.is_empty() {
            let n = sock.read(&mut buf).with_context(closed)?;
            if n == 0 {
                anyhow::bail!("{}", closed());
            }
            decoder
                .decode(&mut buf[..n], |m| replies.push_back(m.to_vec()))
                .with_context(|| format!("a malformed reply from {}", cfg.endpoint))?;
        }
        let mut reply = replies.pop_front().unwrap_or_default();
        if let Framing::Line(_) = cfg.framing {
            while matches!(reply.last(), Some(b'\n' | b'\r')) {
                reply.pop();
            }
        }
        output(&reply)?;
    }
    // Half-close, then wait for the server to close its side.
    sock.shutdown_write()
        .with_context(|| format!("closing the connection to {}", cfg.endpoint))?;
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest)
        .with_context(|| format!("closing the connection to {}", cfg.endpoint))?;
    Ok(Outcome::Ok)
}

fn run_udp(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    let mut req = Requester::connect(cfg)?;
    let mut outcome = Outcome::Ok;
    while let Some(line) = prompt()? {
        let expect = super::udp::expected(cfg.mode, &line);
        let answer = req
            .request(&line, |r| {
                if r == expect.as_slice() {
                    Reply::Good
                } else {
                    Reply::Wrong
                }
            })
            .map_err(|e| super::udp::request_error(cfg, e))?;
        match answer {
            Answer::Good(r) | Answer::Wrong(r) => output(&r)?,
            Answer::Lost => {
                outcome = Outcome::Mismatch;
                eprintln!(
                    "upcase: no reply after {} tries: is the server up?",
                    cfg.udp.retries + 1
                );
            }
        }
    }
    // Let the server know we are gone (client2.py's empty datagram).
    req.send_only(b"")
        .with_context(|| format!("sending goodbye to {}", cfg.endpoint))?;
    Ok(outcome)
}

/// Prints the prompt and reads a line; `None` at an empty line or EOF.
fn prompt() -> anyhow::Result<Option<Vec<u8>>> {
    let mut out = io::stdout().lock();
    out.write_all(b"Input: ").context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    let mut line = Vec::new();
    io::stdin()
        .lock()
        .read_until(b'\n', &mut line)
        .context("reading stdin")?;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    if line.is_empty() {
        // End the prompt's line so the shell prompt starts on its own.
        writeln!(out).context("writing to stdout")?;
        return Ok(None);
    }
    Ok(Some(line))
}

fn output(reply: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "Output: {}", String::from_utf8_lossy(reply)).context("writing to stdout")?;
    out.flush().context("writing to stdout")
}

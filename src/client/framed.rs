//! `upcase send --framing MODE`: messages instead of a stream.
//!
//! Piping stdin: with `line` and `fixed:N` the wire format *is* the input
//! (lines; N-byte chunks), so stdin goes as it is and the replies come back
//! the same way; a last chunk shorter than N is not a message and is not
//! sent (the server would not answer it). With `length` and `netstring`
//! each line of stdin becomes one message, and each reply is printed as a
//! line. As in the plain pipe, sending and receiving run at once, so no
//! amount of input can deadlock.
//!
//! With `--bytes N --size S`: N bytes of S-byte messages of the seeds'
//! pattern in that framing, every reply decoded and verified.

use std::io::{self, BufRead, BufWriter, Read, Write};
use std::thread;
use std::time::Instant;

use anyhow::Context;

use super::stream::StreamReport;
use super::{Outcome, SendConfig};
use crate::framing::{self, Decoder, Framing};
use crate::net::{self, Stream};

pub fn pipe(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    let mut reader = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    let writer = reader.try_clone().context("cloning the socket")?;
    let framing = cfg.framing;
    // Not joined when the server closes first (see `pipe`).
    let sender = thread::Builder::new()
        .name("upcase-stdin".into())
        .spawn(move || send_stdin(writer, framing))
        .context("starting the stdin thread")?;
    let mut out = io::stdout().lock();
    let mut decoder = Decoder::new(framing);
    let mut buf = vec![0u8; 64 * 1024];
    let mut outcome = Outcome::Ok;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if super::is_timeout(&e) => return Err(super::silence(cfg, 0)),
            Err(e) => return Err(e).with_context(|| format!("receiving from {}", cfg.endpoint)),
        };
        match framing {
            Framing::Length(_) | Framing::Netstring(_) => {
                let mut written = Ok(());
                let decoded = decoder.decode(&mut buf[..n], |msg| {
                    if written.is_ok() {
                        written = out.write_all(msg).and_then(|()| out.write_all(b"\n"));
                    }
                });
                written.context("writing to stdout")?;
                if let Err(e) = decoded {
                    eprintln!("upcase: a malformed reply from {}: {e}", cfg.endpoint);
                    outcome = Outcome::Mismatch;
                    break;
                }
            }
            _ => out.write_all(&buf[..n]).context("writing to stdout")?,
        }
        out.flush().context("writing to stdout")?;
    }
    if sender.is_finished()
        && let Ok(Err(e)) = sender.join()
    {
        return Err(e).with_context(|| format!("sending to {}", cfg.endpoint));
    }
    Ok(outcome)
}

/// Sends stdin as messages of `framing`, then half-closes.
fn send_stdin(mut w: Stream, framing: Framing) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut net = BufWriter::with_capacity(64 * 1024, &mut w);
    match framing {
        Framing::Length(_) | Framing::Netstring(_) => {
            let mut line = Vec::new();
            let mut msg = Vec::new();
            while stdin.read_until(b'\n', &mut line)? > 0 {
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                msg.clear();
                framing::encode(framing, &line, &mut msg);
                net.write_all(&msg)?;
                // Each message goes when it is read (typed input must not
                // wait in our buffer).
                net.flush()?;
                line.clear();
            }
        }
        Framing::Fixed(n) => {
            let mut chunk = vec![0u8; n];
            loop {
                let got = read_full(&mut stdin, &mut chunk)?;
                if got == n {
                    net.write_all(&chunk)?;
                    net.flush()?;
                    continue;
                }
                if got > 0 {
                    eprintln!(
                        "upcase: the last {got} bytes of stdin are not a whole {n}-byte message: not sent"
                    );
                }
                break;
            }
        }
        Framing::Line(_) | Framing::Stream => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = stdin.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                net.write_all(&buf[..k])?;
                net.flush()?;
            }
        }
    }
    net.flush()?;
    drop(net);
    w.shutdown_write()
}

/// Reads until `buf` is full or the input ends; how many bytes it got.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// One message of the verified run: `size` bytes in all on the wire's
/// payload side (a line's `\n` included), of the seeds' pattern.
pub fn message(framing: Framing, size: usize) -> Vec<u8> {
    let size = match framing {
        Framing::Fixed(n) => n,
        _ => size.max(1),
    };
    let mut p: Vec<u8> = b"capitalize this!"
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect();
    if let Framing::Line(_) = framing
        && let Some(last) = p.last_mut()
    {
        *last = b'\n';
    }
    p
}

/// `send --bytes N --size S --framing MODE`: sends N bytes worth of S-byte
/// messages and verifies every reply message.
pub fn verify(cfg: &SendConfig, total: u64) -> anyhow::Result<Outcome> {
    let framing = cfg.framing;
    let payload = message(framing, cfg.size);
    let count = total.div_ceil(payload.len() as u64).max(1);
    let mut wire = Vec::new();
    framing::encode(framing, &payload, &mut wire);
    let expect = crate::transform::apply(cfg.mode, &payload).context("the pattern")?;

    let mut reader = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    let mut writer = reader.try_clone().context("cloning the socket")?;
    let start = Instant::now();
    let sender = thread::Builder::new()
        .name("upcase-send".into())
        .spawn(move || -> io::Result<u64> {
            let mut net = BufWriter::with_capacity(256 * 1024, &mut writer);
            for _ in 0..count {
                net.write_all(&wire)?;
            }
            net.flush()?;
            drop(net);
            writer.shutdown_write()?;
            Ok(count * wire.len() as u64)
        })
        .context("starting the sender")?;

    let mut decoder = Decoder::new(framing);
    let mut buf = vec![0u8; 256 * 1024];
    let (mut got, mut wrong, mut received) = (0u64, 0u64, 0u64);
    let mut first_wrong = None;
    let mut malformed = None;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if super::is_timeout(&e) => return Err(super::silence(cfg, received)),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("receiving from {} after {got} messages", cfg.endpoint)
                });
            }
        };
        received += n as u64;
        let r = decoder.decode(&mut buf[..n], |msg| {
            if msg != expect.as_slice() {
                wrong += msg.len() as u64;
                first_wrong.get_or_insert(got * expect.len() as u64);
            }
            got += 1;
        });
        if let Err(e) = r {
            malformed = Some(e);
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let sent = match sender.join() {
        Ok(r) => r.with_context(|| format!("sending to {}", cfg.endpoint))?,
        Err(_) => anyhow::bail!("the sending thread panicked"),
    };
    if let Some(e) = &malformed {
        eprintln!("upcase: a malformed reply from {}: {e}", cfg.endpoint);
    }
    let report = StreamReport {
        sent,
        received,
        wrong,
        first_wrong,
        seconds: secs,
        mb_per_s: super::mb_per_s(received, secs),
    };
    report.print(cfg.json);
    if !cfg.json {
        println!("messages:  {got} of {count}");
        println!("msgs/s:    {:.0}", got as f64 / secs.max(1e-9));
    }
    Ok(if wrong == 0 && got == count && malformed.is_none() {
        Outcome::Ok
    } else {
        Outcome::Mismatch
    })
}

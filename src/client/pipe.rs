//! `upcase send ADDR`: like `nc`, but correct.
//!
//! stdin goes to the server on one thread while the reply is copied to
//! stdout on this one, so no amount of input can deadlock. The end of stdin
//! becomes a half-close (`shutdown(Write)`), which tells the server we are
//! done while still letting it send the rest of the reply; we exit when the
//! server closes its side.

use std::io::{self, Read, Write};
use std::thread;

use anyhow::Context;

use super::{Outcome, SendConfig};
use crate::net::{self, Stream};

pub fn run(cfg: &SendConfig) -> anyhow::Result<Outcome> {
    let mut reader = net::connect(&cfg.endpoint, &cfg.sockopts)?;
    let writer = reader.try_clone().context("cloning the socket")?;
    // Not joined: when the server closes first, stdin may never end (a
    // terminal), and we must not wait for it.
    let sender = thread::Builder::new()
        .name("upcase-stdin".into())
        .spawn(move || copy_stdin(writer))
        .context("starting the stdin thread")?;

    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if super::is_timeout(&e) => return Err(super::silence(cfg, received)),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("receiving from {} after {received} bytes", cfg.endpoint)
                });
            }
        };
        received += n as u64;
        out.write_all(&buf[..n]).context("writing to stdout")?;
        // Interactive use: show each reply as it arrives.
        out.flush().context("writing to stdout")?;
    }
    if sender.is_finished()
        && let Ok(Err(e)) = sender.join()
    {
        return Err(e).with_context(|| format!("sending to {}", cfg.endpoint));
    }
    Ok(Outcome::Ok)
}

fn copy_stdin(mut w: Stream) -> io::Result<u64> {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        sent += n as u64;
    }
    w.shutdown_write()?;
    Ok(sent)
}

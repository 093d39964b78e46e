//! Baseline for `upcase bench --compare`: the plainest thread-per-connection
//! uppercase server, with a 256 KiB buffer. Not part of upcase; kept so that
//! anyone can measure upcase's models against it with one command:
//!
//!     cargo build --release --examples
//!     upcase bench --compare --server 'baseline-threads=target/release/examples/baseline_threads {port}'

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let port = std::env::args().nth(1).unwrap_or_else(|| "1060".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))?;
    println!("listening tcp://{}", listener.local_addr()?);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || serve(conn));
    }
    Ok(())
}

fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(std::net::Shutdown::Write);
        }
        buf[..n].make_ascii_uppercase();
        conn.write_all(&buf[..n])?;
    }
}

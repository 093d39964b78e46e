//! Baseline for `upcase bench --compare`: the plainest tokio
//! task-per-connection uppercase server, with a 64 KiB buffer per task. Not
//! part of upcase; kept so that anyone can measure upcase's models against it:
//!
//!     cargo build --release --examples
//!     upcase bench --compare --server 'baseline-tokio=target/release/examples/baseline_tokio {port}'

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port = std::env::args().nth(1).unwrap_or_else(|| "1060".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening tcp://{}", listener.local_addr()?);
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(serve(conn));
    }
}

async fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return conn.shutdown().await;
        }
        buf[..n].make_ascii_uppercase();
        conn.write_all(&buf[..n]).await?;
    }
}

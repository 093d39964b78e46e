//! Baseline for `upcase bench --framing line`: the plainest tokio server of
//! lines, tokio-util's `Framed` with `LinesCodec::new_with_max_length(65536)`,
//! one reply per message (as the framing benchmark compares against):
//!
//!     cargo build --release --examples
//!     upcase bench --compare --framing line --size 64 --pipeline 32 \
//!       --server 'tokio-lines=target/release/examples/baseline_tokio_lines {port}'

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LinesCodec};

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

async fn serve(conn: TcpStream) {
    // One write per reply message: without TCP_NODELAY, Nagle's algorithm
    // holds the replies after the first until the client's delayed ACK
    // (40 ms), and a pipelining client measures that stall, not the server.
    let _ = conn.set_nodelay(true);
    let mut lines = Framed::new(conn, LinesCodec::new_with_max_length(65536));
    while let Some(Ok(line)) = lines.next().await {
        if lines.send(line.to_ascii_uppercase()).await.is_err() {
            return;
        }
    }
}

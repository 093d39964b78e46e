//! Baseline for `upcase bench --framing length`: the plainest tokio server
//! of length-prefixed messages, tokio-util's `Framed` with
//! `LengthDelimitedCodec` (4-byte big-endian lengths, 8 MiB at most), one
//! reply per message:
//!
//!     cargo build --release --examples
//!     upcase bench --compare --framing length --size 64 --pipeline 32 \
//!       --server 'tokio-length=target/release/examples/baseline_tokio_length {port}'

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

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
    let mut msgs = Framed::new(conn, LengthDelimitedCodec::new());
    while let Some(Ok(mut msg)) = msgs.next().await {
        msg.make_ascii_uppercase();
        if msgs.send(msg.freeze()).await.is_err() {
            return;
        }
    }
}

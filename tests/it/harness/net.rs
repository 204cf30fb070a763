//! Loopback networking for tests: free ports, and the metrics endpoint of
//! `play --metrics`.

use std::time::Duration;

/// A port nothing listens on right now (the OS picks it; it may be taken
/// again before it is used).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole HTTP response of `GET /metrics` on 127.0.0.1:`port`, or None
/// when nothing answers there.
pub async fn get_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(out).ok()?;
    text.starts_with("HTTP/1.").then_some(text)
}

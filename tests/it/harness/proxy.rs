//! A loopback TCP proxy for fault tests ([`Proxy`]): it forwards every
//! connection to an upstream server and can freeze (a black-holed network on
//! which the kernel still ACKs), resume, or cut every connection at once.
//!
//! It runs on a thread of its own with its own runtime, so it never depends
//! on (or blocks) the test's runtime, whatever its flavor.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A TCP proxy on 127.0.0.1 (a random port) to one upstream address. Stopped,
/// with every connection closed, when dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct State {
    frozen: watch::Sender<bool>,
    /// Cancelled by `cut`, which puts a fresh one in its place for the
    /// connections accepted after.
    cut: Mutex<CancellationToken>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to
    /// `upstream`, both ways.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            frozen: watch::Sender::new(false),
            cut: Mutex::new(CancellationToken::new()),
        });
        let shutdown = CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn({
                let state = state.clone();
                let shutdown = shutdown.clone();
                move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name(format!("proxy-{port}"))
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(accept(listener, upstream, state, shutdown));
                    // Dropping the runtime drops every connection's task: the sockets close.
                }
            })
            .unwrap();
        Proxy {
            port,
            state,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The port the proxy listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `db_url` with the proxy's host and port: the same database, through the proxy.
    pub fn url_for(&self, db_url: &str) -> String {
        let mut url = url::Url::parse(db_url)
            .unwrap_or_else(|e| panic!("not a postgres:// URL ({e}): {db_url}"));
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    /// Stops forwarding, both ways, on every connection, those accepted
    /// later included; every socket stays open. What arrives meanwhile is
    /// held (the kernel ACKs it) and delivered on `resume`, as a network that
    /// comes back would.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Forwards again, after `freeze`.
    pub fn resume(&self) {
        self.state.frozen.send_replace(false);
    }

    /// Closes every connection open now, both sides (within milliseconds:
    /// the proxy's own thread closes them). New connections are forwarded
    /// as before.
    pub fn cut(&self) {
        let mut cut = self.state.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The address of the server of a postgres:// URL (its first, when the name
/// resolves to several).
pub fn server_addr(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap_or_else(|e| panic!("not a postgres:// URL ({e}): {url}"));
    let host = url.host_str().unwrap_or("localhost");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, url.port().unwrap_or(5432))
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolving {host}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{host} resolves to no address"))
}

async fn accept(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let listener = TcpListener::from_std(listener).unwrap();
    loop {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let cut = state.cut.lock().unwrap().clone();
        let frozen = state.frozen.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                // Dropping the forwarding future closes both sockets.
                _ = cut.cancelled() => {}
                _ = forward(client, upstream, frozen) => {}
            }
        });
    }
}

/// One connection: connects upstream (once not frozen) and pumps both ways.
async fn forward(client: TcpStream, upstream: SocketAddr, mut frozen: watch::Receiver<bool>) {
    // Frozen: the connection is accepted, but not passed on.
    if frozen.wait_for(|f| !f).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // The client sees its connection closed.
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, frozen.clone()),
        pump(server_read, client_write, frozen),
    );
}

/// Copies `from` to `to`, holding what it read while frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;
    use tokio_postgres::{Client, NoTls};

    // Through the harness's re-exports, as the tests that use it see it.
    use crate::harness::{Proxy, TestDb, connect, server_addr};

    async fn one(c: &Client) -> i32 {
        c.query_one("SELECT 1", &[]).await.unwrap().get(0)
    }

    #[tokio::test]
    async fn the_proxy_forwards_freezes_resumes_and_cuts() {
        let db = TestDb::empty().await;
        let proxy = Proxy::start(server_addr(&db.url));
        let url = proxy.url_for(&db.url);
        assert!(
            url.contains(&format!("127.0.0.1:{}", proxy.port())),
            "{url}"
        );

        let c = connect(&url).await;
        assert_eq!(one(&c).await, 1);

        proxy.freeze();
        let frozen = timeout(Duration::from_secs(2), c.query_one("SELECT 2", &[])).await;
        assert!(frozen.is_err(), "a query answered through a frozen proxy");
        let new = timeout(Duration::from_secs(2), tokio_postgres::connect(&url, NoTls)).await;
        assert!(new.is_err(), "a new connection got through a frozen proxy");

        proxy.resume();
        let c2 = timeout(Duration::from_secs(10), connect(&url))
            .await
            .expect("a new connection after resume");
        assert_eq!(one(&c2).await, 1);
        // The connection open during the freeze works again too.
        assert_eq!(timeout(Duration::from_secs(10), one(&c)).await.unwrap(), 1);

        proxy.cut();
        for client in [&c, &c2] {
            let r = timeout(Duration::from_secs(5), client.query_one("SELECT 1", &[]))
                .await
                .expect("a cut connection fails at once");
            assert!(r.is_err(), "a query answered on a cut connection");
        }
        let c3 = connect(&url).await;
        assert_eq!(one(&c3).await, 1, "new connections go through after a cut");
    }
}

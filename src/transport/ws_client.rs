//! The client end of a BACnet/SC WebSocket: TCP, optional TLS (rustls, only the given CA
//! trusted, optional client certificate), the WebSocket upgrade with a subprotocol, and
//! message-size caps set before any frame is read.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

/// The subprotocol a node uses toward a hub.
pub const HUB_SUBPROTOCOL: &str = "hub.bsc.bacnet.org";
/// The subprotocol of node-to-node direct connections.
pub const DIRECT_SUBPROTOCOL: &str = "dc.bsc.bacnet.org";

/// Any byte stream a WebSocket can run on (plain TCP or TLS over TCP).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

pub type WsStream = WebSocketStream<Box<dyn ByteStream>>;

/// Opens the TCP connection under a WebSocket some other way than a plain
/// connect (a link with connection faults carries it through its pump).
pub trait StreamConnector: Send + Sync {
    fn connect(&self, host: &str, port: u16) -> futures::future::BoxFuture<'static, std::io::Result<Box<dyn ByteStream>>>;
}

/// How to open one WebSocket.
#[derive(Clone)]
pub struct WsConnectOptions {
    /// Required for `wss://`; refused for `ws://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `Sec-WebSocket-Protocol` to ask for; `None` sends no header (a conformance probe).
    pub subprotocol: Option<String>,
    /// For TCP connect, TLS and the upgrade together.
    pub timeout: Duration,
    /// Largest WebSocket message and frame accepted from the peer.
    pub max_message: usize,
    /// Opens the TCP connection; `None`: a plain connect.
    pub connector: Option<Arc<dyn StreamConnector>>,
}

impl WsConnectOptions {
    /// A hub connection: subprotocol `hub.bsc.bacnet.org`, 10 s, 64 KiB messages (a BVLC-SC
    /// message is at most 65535 + header; hubs advertise 1500-6000).
    pub fn hub(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        WsConnectOptions {
            tls,
            subprotocol: Some(HUB_SUBPROTOCOL.into()),
            timeout: Duration::from_secs(10),
            max_message: 64 * 1024,
            connector: None,
        }
    }
}

impl std::fmt::Debug for WsConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnectOptions")
            .field("tls", &self.tls.is_some())
            .field("subprotocol", &self.subprotocol)
            .field("timeout", &self.timeout)
            .field("max_message", &self.max_message)
            .field("connector", &self.connector.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WsConnectError {
    #[error("{url}: not a ws:// or wss:// URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: wss:// needs TLS settings (--tls-dir or --ca)")]
    TlsRequired { url: String },
    #[error("{url}: TLS settings given for a plaintext ws:// URL")]
    TlsOnPlaintext { url: String },
    #[error("{url}: no connection within {} ms", .after.as_millis())]
    Timeout { url: String, after: Duration },
    #[error("{url}: TCP connect failed: {source}")]
    Tcp { url: String, source: std::io::Error },
    #[error("{url}: TLS handshake failed: {source}")]
    Tls { url: String, source: std::io::Error },
    /// The server answered the upgrade with an HTTP error status.
    #[error("{url}: WebSocket upgrade refused with HTTP {status}")]
    Refused { url: String, status: u16 },
    #[error("{url}: WebSocket upgrade failed: {reason}")]
    Upgrade { url: String, reason: String },
}

impl WsConnectError {
    /// The HTTP status when the server refused the upgrade.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            WsConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Parsed pieces of a hub URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl HubUrl {
    pub fn parse(url: &str) -> Result<HubUrl, WsConnectError> {
        let bad = |reason: &str| WsConnectError::BadUrl { url: url.into(), reason: reason.into() };
        let uri: Uri = url.parse().map_err(|e: tokio_tungstenite::tungstenite::http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("scheme must be ws or wss")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(HubUrl { tls, host, port })
    }

    /// True for 127.0.0.0/8, ::1 and `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Opens a WebSocket to `url`. Every step is bounded by `opts.timeout`.
pub async fn connect_ws(url: &str, opts: &WsConnectOptions) -> Result<WsStream, WsConnectError> {
    match tokio::time::timeout(opts.timeout, connect_inner(url, opts)).await {
        Ok(r) => r,
        Err(_) => Err(WsConnectError::Timeout { url: url.into(), after: opts.timeout }),
    }
}

async fn connect_inner(url: &str, opts: &WsConnectOptions) -> Result<WsStream, WsConnectError> {
    let parsed = HubUrl::parse(url)?;
    match (parsed.tls, &opts.tls) {
        (true, None) => return Err(WsConnectError::TlsRequired { url: url.into() }),
        (false, Some(_)) => return Err(WsConnectError::TlsOnPlaintext { url: url.into() }),
        _ => {}
    }
    let tcp: Box<dyn ByteStream> = match &opts.connector {
        Some(c) => c.connect(&parsed.host, parsed.port).await,
        None => TcpStream::connect((parsed.host.as_str(), parsed.port)).await.map(|tcp| {
            // BVLC messages are small and latency matters more than packet count.
            let _ = tcp.set_nodelay(true);
            Box::new(tcp) as Box<dyn ByteStream>
        }),
    }
    .map_err(|source| WsConnectError::Tcp { url: url.into(), source })?;
    let stream: Box<dyn ByteStream> = match (parsed.tls, &opts.tls) {
        (true, Some(cfg)) => {
            let name = rustls::pki_types::ServerName::try_from(parsed.host.clone()).map_err(|e| {
                WsConnectError::BadUrl { url: url.into(), reason: format!("host is not a valid TLS server name: {e}") }
            })?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| WsConnectError::Tls { url: url.into(), source })?;
            Box::new(tls)
        }
        _ => tcp,
    };
    let mut request = url
        .into_client_request()
        .map_err(|e| WsConnectError::BadUrl { url: url.into(), reason: e.to_string() })?;
    if let Some(p) = &opts.subprotocol {
        let v = HeaderValue::from_str(p)
            .map_err(|e| WsConnectError::BadUrl { url: url.into(), reason: format!("subprotocol {p:?}: {e}") })?;
        request.headers_mut().insert("Sec-WebSocket-Protocol", v);
    }
    // tungstenite zero-fills its whole read buffer before every read (default 128 KiB):
    // with one small SC frame per read that was most of a node's receive cost.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(opts.max_message))
        .max_frame_size(Some(opts.max_message));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _resp)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(WsConnectError::Refused { url: url.into(), status: resp.status().as_u16() }),
        Err(e) => Err(WsConnectError::Upgrade { url: url.into(), reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_urls_parse_with_default_ports_and_loopback() {
        assert_eq!(
            HubUrl::parse("wss://127.0.0.1:4443/hub").unwrap(),
            HubUrl { tls: true, host: "127.0.0.1".into(), port: 4443 }
        );
        assert_eq!(HubUrl::parse("ws://localhost").unwrap().port, 80);
        assert_eq!(HubUrl::parse("wss://[::1]").unwrap().host, "::1");
        assert!(HubUrl::parse("ws://[::1]:9").unwrap().is_loopback());
        assert!(!HubUrl::parse("ws://10.0.0.1:9").unwrap().is_loopback());
        let e = HubUrl::parse("http://x").unwrap_err().to_string();
        assert!(e.contains("scheme must be ws or wss"), "{e}");
        assert!(HubUrl::parse("not a url").is_err());
    }

    #[tokio::test]
    async fn refused_tcp_and_wrong_tls_settings_are_clear_errors() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = connect_ws(&format!("ws://127.0.0.1:{port}"), &WsConnectOptions::hub(None)).await.err().expect("must fail");
        assert!(matches!(e, WsConnectError::Tcp { .. }), "{e}");
        let e = connect_ws(&format!("wss://127.0.0.1:{port}"), &WsConnectOptions::hub(None)).await.err().expect("must fail");
        assert!(matches!(e, WsConnectError::TlsRequired { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", l.local_addr().unwrap());
        let mut o = WsConnectOptions::hub(None);
        o.timeout = Duration::from_millis(200);
        let e = connect_ws(&url, &o).await.err().expect("must fail");
        assert!(matches!(e, WsConnectError::Timeout { .. }), "{e}");
        drop(l);
    }
}

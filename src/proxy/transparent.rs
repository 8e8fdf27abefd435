//! The transparent listener (iptables REDIRECT target): original destination from
//! `SO_ORIGINAL_DST`, sandbox from the source IP, host from the TLS SNI.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ProxyState;

/// Serves one redirected connection.
pub async fn serve_client(_state: Arc<ProxyState>, _tcp: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "transparent mode not implemented yet; closing");
}

//! Recovering a redirected connection's original destination.

use std::net::SocketAddrV4;

/// Where the kernel recorded the original destinations of redirected connections.
///
/// The agent implements it over the eBPF map; tests use an in-memory table.
pub trait OrigDstLookup: Send + Sync + 'static {
    /// Returns and forgets the original destination of the connection whose client end is
    /// `client`, as seen by the proxy's `accept()`.
    fn take(&self, client: SocketAddrV4) -> Result<Option<SocketAddrV4>, LookupError>;
}

/// The lookup itself failed (as opposed to finding nothing).
#[derive(Debug, thiserror::Error)]
#[error("original destination lookup for {client} failed: {reason}")]
pub struct LookupError {
    pub client: SocketAddrV4,
    pub reason: String,
}

/// A fixed table, for tests and for running the proxy without the kernel side.
#[derive(Debug, Default)]
pub struct StaticTable {
    entries: std::sync::Mutex<std::collections::HashMap<SocketAddrV4, SocketAddrV4>>,
}

impl StaticTable {
    pub fn insert(&self, client: SocketAddrV4, orig: SocketAddrV4) {
        self.entries.lock().expect("table lock").insert(client, orig);
    }
}

impl OrigDstLookup for StaticTable {
    fn take(&self, client: SocketAddrV4) -> Result<Option<SocketAddrV4>, LookupError> {
        Ok(self.entries.lock().expect("table lock").remove(&client))
    }
}

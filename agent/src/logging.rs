//! The agent's log output: `tracing` to stderr, filtered by RUST_LOG or --log-level.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. `default` applies when RUST_LOG is unset, e.g.
/// `info,gammaray::kernel=debug` to see every redirect the kernel logs.
pub fn init(default: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if let Err(err) = result {
        eprintln!("logging already initialised: {err}");
    }
}

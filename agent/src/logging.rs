//! The agent's log output: `tracing` to stderr, filtered by RUST_LOG or --log-level.
//!
//! Lines at INFO and below, the access log's one line per request among them, are gathered and
//! written out every [`FLUSH_EVERY`] or once [`FLUSH_AT`] bytes wait, instead of costing the
//! proxy's thread a write(2) per line. A WARN or ERROR line is written at once, after
//! everything gathered before it, so the output keeps its order. What is gathered is written
//! out when the guard [`init`] returns is dropped, and before a panic's message; a process
//! killed outright loses at most [`FLUSH_EVERY`] of INFO lines.

use std::{
    io::{self, Write as _},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use tracing::{Level, Metadata};
use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter};

/// The longest an INFO line waits to be written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Gathered bytes that are written out without waiting for the timer.
pub const FLUSH_AT: usize = 64 * 1024;

type Sink = Box<dyn Fn(&[u8]) -> io::Result<()> + Send + Sync>;

/// Lines waiting to be written, and where they go.
pub struct Output {
    pending: Mutex<Vec<u8>>,
    sink: Sink,
}

impl Output {
    fn new(sink: Sink) -> Arc<Self> {
        Arc::new(Self { pending: Mutex::new(Vec::with_capacity(FLUSH_AT)), sink })
    }

    /// Adds one formatted line; writes out everything gathered when `now` or when it is full.
    fn write_line(&self, line: &[u8], now: bool) -> io::Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend_from_slice(line);
        if now || pending.len() >= FLUSH_AT { self.drain(&mut pending) } else { Ok(()) }
    }

    /// Writes out what is gathered.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self.drain(&mut pending);
    }

    fn drain(&self, pending: &mut Vec<u8>) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let result = (self.sink)(pending);
        pending.clear();
        result
    }
}

/// The subscriber's writer: a line at WARN or above is written at once.
#[derive(Clone)]
struct Gathered(Arc<Output>);

struct LineWriter<'a> {
    output: &'a Output,
    now: bool,
}

impl io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write_line(buf, self.now)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Gathered {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { output: &self.0, now: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter { output: &self.0, now: *meta.level() <= Level::WARN }
    }
}

/// Writes out the gathered lines when dropped.
#[must_use = "lines gathered but not yet written are lost if the guard is dropped early or never"]
pub struct LogGuard(Arc<Output>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Writes out `output` every [`FLUSH_EVERY`] from a thread of its own, until it is gone.
fn flush_periodically(output: Weak<Output>) {
    let spawned = std::thread::Builder::new().name("log-flush".into()).spawn(move || {
        loop {
            std::thread::sleep(FLUSH_EVERY);
            let Some(output) = output.upgrade() else { return };
            output.flush();
        }
    });
    if let Err(err) = spawned {
        eprintln!("cannot start the log flusher ({err}); INFO lines are written when {FLUSH_AT} bytes wait");
    }
}

/// Installs the global subscriber. `default` applies when RUST_LOG is unset, e.g.
/// `info,gammaray::kernel=debug` to see every redirect the kernel logs. Keep the guard until the
/// process ends.
pub fn init(default: &str, json: bool) -> LogGuard {
    let output = Output::new(Box::new(|bytes| io::stderr().lock().write_all(bytes)));
    flush_periodically(Arc::downgrade(&output));
    let on_panic = Arc::downgrade(&output);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(output) = on_panic.upgrade() {
            output.flush();
        }
        previous(info);
    }));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(Gathered(output.clone()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if let Err(err) = result {
        eprintln!("logging already initialised: {err}");
    }
    LogGuard(output)
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    use tracing::Level;
    use tracing_subscriber::fmt::MakeWriter as _;

    use super::{FLUSH_AT, FLUSH_EVERY, Gathered, Output};

    fn output() -> (Arc<Output>, Arc<Mutex<Vec<u8>>>) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = written.clone();
        let output = Output::new(Box::new(move |bytes| {
            sink.lock().expect("sink").extend_from_slice(bytes);
            Ok(())
        }));
        (output, written)
    }

    fn text(written: &Mutex<Vec<u8>>) -> String {
        String::from_utf8(written.lock().expect("sink").clone()).expect("utf-8")
    }

    fn line(writer: &Gathered, level: &'static tracing::Metadata<'static>, text: &str) {
        writer.make_writer_for(level).write_all(text.as_bytes()).expect("write");
    }

    macro_rules! metadata {
        ($level:expr) => {{
            struct Callsite;
            impl tracing::callsite::Callsite for Callsite {
                fn set_interest(&self, _: tracing::subscriber::Interest) {}
                fn metadata(&self) -> &tracing::Metadata<'_> {
                    &META
                }
            }
            static CALLSITE: Callsite = Callsite;
            static META: tracing::Metadata<'static> = tracing::Metadata::new(
                "test",
                "gammaray_agent::logging::tests",
                $level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
                tracing::metadata::Kind::EVENT,
            );
            &META
        }};
    }

    #[test]
    fn info_lines_wait_and_a_warning_writes_them_out_first_in_order() {
        let (output, written) = output();
        let writer = Gathered(output.clone());
        line(&writer, metadata!(Level::INFO), "request 1\n");
        line(&writer, metadata!(Level::DEBUG), "request 2\n");
        assert_eq!(text(&written), "", "INFO and DEBUG lines are gathered");
        line(&writer, metadata!(Level::WARN), "upstream failed\n");
        assert_eq!(text(&written), "request 1\nrequest 2\nupstream failed\n");
        line(&writer, metadata!(Level::INFO), "request 3\n");
        line(&writer, metadata!(Level::ERROR), "stopped\n");
        assert_eq!(text(&written), "request 1\nrequest 2\nupstream failed\nrequest 3\nstopped\n");
        line(&writer, metadata!(Level::INFO), "last\n");
        drop(super::LogGuard(output));
        assert!(text(&written).ends_with("stopped\nlast\n"), "the guard writes out the rest");
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting() {
        let (output, written) = output();
        let writer = Gathered(output);
        let one = "x".repeat(1023) + "\n";
        for _ in 0..FLUSH_AT / one.len() - 1 {
            line(&writer, metadata!(Level::INFO), &one);
        }
        assert_eq!(text(&written), "", "below the threshold nothing is written");
        line(&writer, metadata!(Level::INFO), &one);
        assert_eq!(text(&written).len(), FLUSH_AT, "at the threshold everything is");
    }

    #[test]
    fn gathered_lines_are_written_by_the_flusher_within_its_period() {
        let (output, written) = output();
        super::flush_periodically(Arc::downgrade(&output));
        line(&Gathered(output.clone()), metadata!(Level::INFO), "request\n");
        let started = Instant::now();
        while text(&written).is_empty() && started.elapsed() < FLUSH_EVERY * 50 {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(text(&written), "request\n", "written within {:?}", started.elapsed());
    }
}

use std::{
    io,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::jiff::Timestamp;
use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

use super::{capture::Captured, *};

#[derive(Debug)]
struct Outer(Inner);
#[derive(Debug)]
struct Inner;

impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection failed")
    }
}
impl std::fmt::Display for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset by \"peer\"")
    }
}
impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
impl std::error::Error for Inner {}

/// Every kind of field and span the agent logs, and the awkward values: quotes, escapes,
/// control characters, non-ASCII, the extreme integers, errors with sources, raw names.
fn emit_everything() {
    // What `logging::init` installs with the subscriber; once per process, which is enough.
    let _ = tracing_log::LogTracer::init();
    let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    tracing::trace!("before any span");
    let outer = tracing::info_span!("outbound", src = %addr, late = tracing::field::Empty);
    let _entered = outer.enter();
    outer.record("late", 7u64);
    tracing::info!(
        src = %addr,
        identity = %"spiffe://cluster.local/ns/a/sa/b",
        v6 = %"[fd00::1]:80".parse::<SocketAddr>().unwrap(),
        mtls = true,
        method = %http::Method::GET,
        path = "/a b?c=d",
        status = 200u16,
        bytes = "1024",
        duration_ms = 0u64,
        "request"
    );
    let inner = tracing::debug_span!("inner", n = 3i64, r#type = "x", slice = &b"abc"[..], ratio = 0.25f64);
    inner.in_scope(|| {
        tracing::warn!(
            quoted = "say \"hi\"\n\ttab\\",
            unicode = "naïve ☃",
            control = "\x1b[31mred\x07",
            empty = "",
            negative = -42i64,
            min = i64::MIN,
            max = u64::MAX,
            float = 1.5f64,
            not_a_number = f64::NAN,
            raw = &b"\x00ab"[..],
            list = ?vec![1, 2],
            r#type = "raw",
            "a message with {} and \x1b[1m{}",
            "arguments",
            "an escape"
        );
        let err = Outer(Inner);
        tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
        tracing::error!(error = &Inner as &(dyn std::error::Error + 'static));
    });
    tracing::info!(target: "gammaray::kernel", pid = 42u64, "from the kernel");
    // A record of the `log` crate, as rustls writes them, forwarded into tracing.
    tracing_log::log::warn!(target: "rustls::conn", "a record of the log crate: {}", 7);
    tracing::info!(only = 1u64);
    tracing::info!(message = "a message field", after = false);
    tracing::info!("");
    drop(_entered);
    tracing::debug!(after_spans = "yes");
    tracing::info!(parent: &outer, "an explicit parent outside any span");
}

/// The lines a subscriber, made to write to the given writer, writes for [`emit_everything`].
fn emitted<S>(subscriber: impl FnOnce(Captured) -> S) -> Vec<String>
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    let captured = Captured::default();
    tracing::subscriber::with_default(subscriber(captured.clone()), emit_everything);
    captured.lines()
}

/// tracing-subscriber's default format, without colours, is the reference: the project's
/// formatter must write the same lines, apart from the instant in the timestamp.
#[test]
fn lines_are_tracing_subscribers_plain_format() {
    let reference = emitted(|writer| {
        let filter = EnvFilter::new("trace");
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(false).finish()
    });
    let ours = emitted(|writer| plain(EnvFilter::new("trace"), writer));
    assert_eq!(reference.len(), 12, "{reference:#?}");
    assert_eq!(ours.len(), reference.len(), "{ours:#?}");
    for (ours, reference) in ours.iter().zip(&reference) {
        let (stamp, rest) = ours.split_at(27);
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{ours}");
        assert_eq!(rest, &reference[27..]);
    }
    // The lines really hold what was asked of them: spot checks of the shapes, not only equality.
    assert!(ours[1].contains(
        "  INFO outbound{src=127.0.0.1:5000 late=7}: gammaray_agent::logging::tests: request src=127.0.0.1:5000"
    ));
    assert!(ours[1].ends_with(r#"path="/a b?c=d" status=200 bytes="1024" duration_ms=0"#), "{}", ours[1]);
    assert!(ours[2].contains(r#"min=-9223372036854775808 max=18446744073709551615"#), "{}", ours[2]);
    assert!(ours[3].contains("error.sources=["), "{}", ours[3]);
}

/// The filter applies as it does with tracing-subscriber's formatter.
#[test]
fn the_filter_decides_what_is_written() {
    let lines = emitted(|writer| plain(EnvFilter::new("warn,gammaray::kernel=info"), writer));
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(lines[0].contains(" WARN ") && lines[3].contains("from the kernel"), "{lines:#?}");
    // The `log` record keeps its own level and target; the span, at `info`, is filtered out.
    assert!(lines[4].ends_with("  WARN rustls::conn: a record of the log crate: 7"), "{lines:#?}");
}

fn ours(at: SystemTime) -> String {
    let mut text = String::new();
    write_timestamp(&mut Writer::new(&mut text), at).unwrap();
    text
}

#[test]
fn timestamps_are_utc_to_the_microsecond() {
    let at = |secs, nanos| ours(UNIX_EPOCH + Duration::new(secs, nanos));
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(at(951_782_400, 500_000_999), "2000-02-29T00:00:00.500000Z");
    assert_eq!(at(1_709_251_199, 1_000), "2024-02-29T23:59:59.000001Z");
    assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    assert_eq!(at(253_402_300_799, 999_999_999), "9999-12-31T23:59:59.999999Z");
}

/// Every day from 1970 to 2200, and every 13th day to the year 9999, at a time of day that
/// moves through the day, against jiff's calendar.
#[test]
fn dates_agree_with_jiff() {
    let days = (0..84_000).chain((84_000..2_932_897).step_by(13));
    for day in days {
        let secs = day * 86_400 + (day * 7_919) % 86_400;
        let at = UNIX_EPOCH + Duration::new(secs, 123_456_789);
        let expected = Timestamp::new(secs as i64, 123_456_789).unwrap().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
        assert_eq!(ours(at), expected.to_string(), "day {day}");
    }
}

/// The instant written is now: between two of tracing-subscriber's own readings of the clock,
/// taken just before and just after (fixed-width timestamps sort as text).
#[test]
fn timestamps_read_the_clock_as_tracing_subscriber_does() {
    let reading = || {
        let mut text = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut text)).unwrap();
        text
    };
    let before = reading();
    let now = ours(SystemTime::now());
    let after = reading();
    assert!(before <= now && now <= after, "{before} {now} {after}");

    // A clock set before 1970 or past 9999 is left to tracing-subscriber, which reads it again.
    for odd in [UNIX_EPOCH - Duration::from_secs(86_400), UNIX_EPOCH + Duration::from_secs(253_402_300_800)] {
        let before = reading();
        let written = ours(odd);
        let after = reading();
        assert!(before <= written && written <= after, "{before} {written} {after}");
    }
}

/// The same for JSON: tracing-subscriber's JSON format is the reference, byte for byte apart
/// from the timestamp, and every line is one JSON object.
#[test]
fn json_lines_are_tracing_subscribers_json_format() {
    let reference = emitted(|writer| {
        tracing_subscriber::fmt().with_env_filter(EnvFilter::new("trace")).with_writer(writer).json().finish()
    });
    let ours = emitted(|writer| json_lines(EnvFilter::new("trace"), writer));
    assert_eq!(reference.len(), 12, "{reference:#?}");
    assert_eq!(ours.len(), reference.len(), "{ours:#?}");
    let prefix = r#"{"timestamp":""#;
    for (ours, reference) in ours.iter().zip(&reference) {
        let stamp = &ours[prefix.len()..prefix.len() + 27];
        assert!(ours.starts_with(prefix) && stamp.ends_with('Z'), "{ours}");
        assert_eq!(&ours[prefix.len() + 27..], &reference[prefix.len() + 27..]);
        let value: serde_json::Value = serde_json::from_str(ours).expect("a JSON object");
        assert_eq!(value["timestamp"], stamp);
    }
    let request: serde_json::Value = serde_json::from_str(&ours[1]).unwrap();
    assert_eq!(request["fields"]["status"], 200);
    assert_eq!(request["fields"]["path"], "/a b?c=d");
    assert_eq!(request["span"]["late"], 7);
    assert_eq!(request["spans"][0]["name"], "outbound");
    let warning: serde_json::Value = serde_json::from_str(&ours[2]).unwrap();
    assert_eq!(warning["fields"]["control"], "\x1b[31mred\x07");
    assert_eq!(warning["fields"]["quoted"], "say \"hi\"\n\ttab\\");
    assert_eq!(warning["spans"][1]["slice"], serde_json::json!([97, 98, 99]));
}

/// Sinks for [`Batched`], one per test (a sink is a plain `fn`, and tests run in parallel):
/// each records the batches it was given.
macro_rules! sinks {
    ($($sink:ident, $batches:ident;)*) => {$(
        static $batches: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        fn $sink(bytes: &[u8]) {
            $batches.lock().unwrap().push(bytes.to_vec());
        }
    )*};
}

sinks! {
    sink_at_once, AT_ONCE;
    sink_kept, KEPT;
    sink_full, FULL;
    sink_ended, ENDED;
    sink_runtime, RUNTIME;
}

fn batches(of: &Mutex<Vec<Vec<u8>>>) -> Vec<String> {
    of.lock().unwrap().iter().map(|b| String::from_utf8(b.clone()).unwrap()).collect()
}

fn write_line(writer: &mut Batched, line: &str) {
    io::Write::write_all(writer, line.as_bytes()).unwrap();
}

#[test]
fn a_thread_that_has_not_gone_idle_writes_each_line_at_once() {
    let mut writer = Batched::new(sink_at_once);
    write_line(&mut writer, "one\n");
    write_line(&mut writer, "two\n");
    assert_eq!(batches(&AT_ONCE), ["one\n", "two\n"]);
}

#[test]
fn an_idle_runtime_thread_keeps_its_lines_until_it_next_goes_idle() {
    let mut writer = Batched::new(sink_kept);
    flush_on_park();
    for line in ["one\n", "two\n", "three\n"] {
        write_line(&mut writer, line);
    }
    assert!(batches(&KEPT).is_empty(), "kept while the thread has work");
    flush_on_park();
    assert_eq!(batches(&KEPT), ["one\ntwo\nthree\n"], "one write, whole lines, in order");
    flush_on_park();
    assert_eq!(batches(&KEPT).len(), 1, "nothing kept, nothing written");
    write_line(&mut writer, "four\n");
    flush_thread();
    assert_eq!(batches(&KEPT), ["one\ntwo\nthree\n", "four\n"], "written before a panic's message");
}

#[test]
fn a_busy_thread_writes_once_it_holds_a_batch() {
    let mut writer = Batched::new(sink_full);
    flush_on_park();
    let line = format!("{}\n", "x".repeat(999));
    let lines = BATCH_BYTES / line.len() + 1;
    for _ in 0..lines {
        write_line(&mut writer, &line);
    }
    let written = batches(&FULL);
    assert_eq!(written.len(), 1, "written without waiting to go idle");
    assert_eq!(written[0].len(), lines * line.len());
    assert!(written[0].len() >= BATCH_BYTES);
}

#[test]
fn a_thread_that_ends_writes_what_it_kept() {
    std::thread::spawn(|| {
        let mut writer = Batched::new(sink_ended);
        flush_on_park();
        write_line(&mut writer, "last words\n");
    })
    .join()
    .unwrap();
    assert_eq!(batches(&ENDED), ["last words\n"]);
}

/// Through a subscriber and a runtime, as the agent runs them: lines logged in one turn of the
/// runtime leave in one write when it has nothing else to do, before the timer it waits for.
#[test]
fn a_runtime_writes_a_turns_lines_together_when_it_goes_idle() {
    let subscriber = plain(EnvFilter::new("info"), Batched::new(sink_runtime));
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(flush_on_park)
        .build()
        .unwrap();
    rt.block_on(async {
        // The runtime has not gone idle yet: this thread still writes at once.
        tracing::info!("first");
        assert_eq!(batches(&RUNTIME).len(), 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        tracing::info!("second");
        tracing::info!("third");
        assert_eq!(batches(&RUNTIME).len(), 1, "kept while the task runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let written = batches(&RUNTIME);
        assert_eq!(written.len(), 2, "written while the runtime waited: {written:?}");
        let lines: Vec<&str> = written[1].lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with("second") && lines[1].ends_with("third"), "{lines:?}");
    });
}

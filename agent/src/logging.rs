//! The agent's log output: `tracing` to stderr, filtered by RUST_LOG or --log-level.
//!
//! Written to a terminal, lines are tracing-subscriber's own full format, in colour. Written
//! anywhere else (a pod's log, a file), which is where a node's access log goes at the
//! deployed level, lines come from [`Line`]: the same text, byte for byte, made with less work.
//! tracing-subscriber's formatter styles every field name and `=` through its ANSI painter even
//! with colours off, and formats the timestamp with eight `write!` calls; at one access-log line
//! per request that was a quarter of the proxies' work on a cross-node L7 request
//! (`cargo xtask bench --instructions`). With `--log-json`, [`JsonLine`] writes
//! tracing-subscriber's JSON shape, byte for byte, at a quarter of what its formatter cost.
//!
//! Those lines go out through [`Batched`]: a runtime's thread keeps the lines it logs while it
//! has work and writes them with one write(2) when it goes idle, so a busy node's access log
//! costs a system call per batch rather than per request.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    io,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::{
    EnvFilter,
    field::{MakeVisitor, Visit, VisitFmt, VisitOutput},
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
        format::{DefaultVisitor, JsonFields, Writer},
        time::FormatTime,
    },
    registry::{Extensions, LookupSpan},
    util::SubscriberInitExt as _,
};

#[cfg(test)]
pub(crate) mod capture;
#[cfg(test)]
mod tests;

/// Installs the global subscriber. `default` applies when RUST_LOG is unset, e.g.
/// `info,gammaray::kernel=debug` to see every redirect the kernel logs. Runtimes whose threads
/// log should call [`flush_on_park`] from `on_thread_park`, and the program [`flush_thread`]
/// before it ends; a panic writes what its thread kept before its message.
pub fn init(default: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush_thread();
        report(info);
    }));
    let stderr = Batched::new(stderr_sink);
    // `try_init` also forwards the `log` crate's records (rustls logs through it) into tracing.
    let result = if json {
        json_lines(filter, stderr).try_init()
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(true)
            .finish()
            .try_init()
    } else {
        plain(filter, stderr).try_init()
    };
    if let Err(err) = result {
        eprintln!("logging already initialised: {err}");
    }
}

/// How many bytes of lines a thread keeps before it writes them without waiting to go idle:
/// a thread that stays busy writes about every 100 access-log lines.
pub const BATCH_BYTES: usize = 32 * 1024;

/// Where [`Batched`] writes: one call per batch of whole lines.
pub type Sink = fn(&[u8]);

/// Writes `bytes` to stderr. A line that cannot be written is dropped, as tracing-subscriber
/// drops it.
pub fn stderr_sink(bytes: &[u8]) {
    let _ = io::Write::write_all(&mut io::stderr().lock(), bytes);
}

/// Log lines written in batches rather than with one write(2) each. A thread that calls
/// [`flush_on_park`] whenever it goes idle (a Tokio runtime's thread, through the runtime's
/// `on_thread_park`) keeps its lines until then, or until it holds [`BATCH_BYTES`]: a busy
/// proxy writes many access-log lines with one system call, and an idle one still writes a
/// request's line as soon as it has nothing else to do. Any other thread, and one that has not
/// gone idle yet, writes each line at once. Lines stay whole and in order within a thread;
/// between threads, their timestamps give the order.
#[derive(Clone, Copy, Debug)]
pub struct Batched {
    sink: Sink,
}

impl Batched {
    pub fn new(sink: Sink) -> Self {
        Self { sink }
    }
}

impl<'w> MakeWriter<'w> for Batched {
    type Writer = Self;

    fn make_writer(&'w self) -> Self {
        *self
    }
}

impl io::Write for Batched {
    /// tracing-subscriber hands over each event's line in one call.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let kept = PENDING
            .try_with(|pending| match pending.try_borrow_mut() {
                Ok(mut pending) if pending.batching => {
                    pending.keep(self.sink, line);
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !kept {
            (self.sink)(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The lines one thread has kept.
struct Pending {
    /// The thread goes idle through [`flush_on_park`], which writes them.
    batching: bool,
    sink: Option<Sink>,
    lines: Vec<u8>,
}

impl Pending {
    fn keep(&mut self, sink: Sink, line: &[u8]) {
        if self.sink.is_some_and(|kept_for| !std::ptr::fn_addr_eq(kept_for, sink)) {
            self.write_out();
        }
        self.sink = Some(sink);
        self.lines.extend_from_slice(line);
        if self.lines.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    fn write_out(&mut self) {
        if let Some(sink) = self.sink
            && !self.lines.is_empty()
        {
            sink(&self.lines);
            self.lines.clear();
        }
    }
}

impl Drop for Pending {
    /// A thread that ends writes what it kept.
    fn drop(&mut self) {
        self.write_out();
    }
}

thread_local! {
    static PENDING: RefCell<Pending> =
        const { RefCell::new(Pending { batching: false, sink: None, lines: Vec::new() }) };
}

fn with_pending(f: impl FnOnce(&mut Pending)) {
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            f(&mut pending);
        }
    });
}

/// For a runtime's `on_thread_park`: writes the lines this thread kept, and has it keep its
/// lines from now on until it next goes idle.
pub fn flush_on_park() {
    with_pending(|pending| {
        pending.batching = true;
        pending.write_out();
    });
}

/// Writes the lines this thread kept: before a panic's message, and before the program ends
/// (the main thread's thread-locals are not dropped at exit).
pub fn flush_thread() {
    with_pending(Pending::write_out);
}

/// The subscriber for output that is not a terminal: [`Line`] and [`Fields`] in
/// tracing-subscriber's registry, so spans and filters work as they do everywhere else.
pub fn plain<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .event_format(Line)
        .fmt_fields(Fields)
        .finish()
}

/// The subscriber for `--log-json`: [`JsonLine`], with span fields kept as tracing-subscriber's
/// [`JsonFields`] keeps them.
pub fn json_lines<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .fmt_fields(JsonFields::new())
        .event_format(JsonLine)
        .finish()
}

/// One line per event, as tracing-subscriber's default format writes it without colours:
/// `2026-11-30T03:30:23.583394Z  INFO outbound{src=10.0.0.1:5000}: target: message k=v ...`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Line;

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A record of the `log` crate carries its level and target in fields of its own.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                seen = true;
                writer.write_str(span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, written from the digits. `now` is the clock's reading;
/// one before 1970 or after 9999 (a badly set clock) is left to tracing-subscriber's clock
/// format, which reads the clock again.
fn write_timestamp(writer: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    let Some(since) = now.duration_since(UNIX_EPOCH).ok().filter(|d| d.as_secs() < 253_402_300_800) else {
        return tracing_subscriber::fmt::time::SystemTime.format_time(writer);
    };
    let secs = since.as_secs();
    let (year, month, day) = civil_date(secs / 86_400);
    let in_day = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], in_day / 3600);
    put_digits(&mut text[14..16], in_day / 60 % 60);
    put_digits(&mut text[17..19], in_day % 60);
    put_digits(&mut text[20..26], u64::from(since.subsec_micros()));
    // Only ASCII digits were written over an ASCII template.
    writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01, for days
/// on or after it: the date is worked out in 400-year eras that start on 1 March, so that the
/// leap day falls at the end of each era's year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719 468 counted from 0000-03-01.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// Writes `value`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Formats fields as `name=value`, separated by spaces, as tracing-subscriber's default fields
/// do without colours: strings quoted and escaped as `{:?}` does, other values as their
/// `Debug` (a `%value` field's `Display`). The message and errors, which tracing-subscriber
/// escapes in its own way, go to its visitor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fields;

impl<'a> MakeVisitor<Writer<'a>> for Fields {
    type Visitor = FieldVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> FieldVisitor<'a> {
        FieldVisitor { writer, empty: true, result: Ok(()) }
    }
}

/// [`Fields`]' visitor over one event's or span's fields.
pub struct FieldVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

impl<'a> FieldVisitor<'a> {
    /// Starts a field whose name needs no special handling: the separator, the name and `=`.
    /// `None` when the field is written already: `message` and `r#` names go to
    /// tracing-subscriber's visitor through `record`, and `log.` metadata is left out, as
    /// tracing-subscriber leaves it out.
    fn start(
        &mut self,
        field: &Field,
        record: impl FnOnce(&mut DefaultVisitor<'_>),
    ) -> Option<&mut Writer<'a>> {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        if name == "message" || name.starts_with("r#") {
            let mut visitor = DefaultVisitor::new(self.writer.by_ref(), std::mem::take(&mut self.empty));
            record(&mut visitor);
            self.result = visitor.finish();
            return None;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self.result.and_then(|()| {
            self.writer.write_str(name)?;
            self.writer.write_char('=')
        });
        self.result.is_ok().then_some(&mut self.writer)
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(writer) = self.start(field, |v| v.record_str(field, value)) {
            self.result = write_quoted(writer, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(writer) = self.start(field, |v| v.record_u64(field, value)) {
            self.result = write_u64(writer, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Some(writer) = self.start(field, |v| v.record_i64(field, value)) {
            self.result = write_i64(writer, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if let Some(writer) = self.start(field, |v| v.record_bool(field, value)) {
            self.result = writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // Errors are rare and tracing-subscriber writes their sources in its own shape.
        if self.result.is_ok() && !field.name().starts_with("log.") {
            let mut visitor = DefaultVisitor::new(self.writer.by_ref(), std::mem::take(&mut self.empty));
            visitor.record_error(field, value);
            self.result = visitor.finish();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if let Some(writer) = self.start(field, |v| v.record_debug(field, value)) {
            self.result = write!(writer, "{value:?}");
        }
    }
}

impl VisitOutput<fmt::Result> for FieldVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for FieldVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// A string as `{:?}` writes it. Printable ASCII without quotes or backslashes, which is what
/// paths, header values and names almost always are, is copied as it is; anything else goes
/// through `Debug`, so the escapes are the standard library's.
fn write_quoted(writer: &mut Writer<'_>, value: &str) -> fmt::Result {
    if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
        writer.write_char('"')?;
        writer.write_str(value)?;
        writer.write_char('"')
    } else {
        write!(writer, "{value:?}")
    }
}

/// A number's decimal digits, without going through `core::fmt`.
fn write_u64(writer: &mut Writer<'_>, mut value: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    writer.write_str(std::str::from_utf8(&digits[start..]).map_err(|_| fmt::Error)?)
}

/// A signed number's decimal digits, as [`write_u64`] writes them.
fn write_i64(writer: &mut Writer<'_>, value: i64) -> fmt::Result {
    if value < 0 {
        writer.write_char('-')?;
    }
    write_u64(writer, value.unsigned_abs())
}

/// One JSON object per event, as tracing-subscriber's JSON format writes it (`timestamp`,
/// `level`, `fields`, `target`, then `span` and `spans` when there is one), with less work. That
/// format parses each span's stored fields back from JSON for every event, twice when the span
/// is both the current one and in the list, and collects each `Debug` value into a `String` of
/// its own. Here the event's fields are written straight into the line, and a span's stored
/// fields, which tracing-subscriber's [`JsonFields`] keeps as one JSON object with its keys
/// sorted, are copied with the span's name added at the end: the object that parsing and
/// writing it again would make.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_str("\",\"fields\":{")?;
        let mut fields = JsonEventFields { writer: writer.by_ref(), first: true, result: Ok(()) };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("},\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        // As tracing-subscriber does: `span` is the event's parent or else the current span,
        // and `spans` lists the current span's scope, from the root.
        if let Some(span) = event.parent().and_then(|id| ctx.span(id)).or_else(|| ctx.lookup_current()) {
            writer.write_str(",\"span\":")?;
            write_json_span(&mut writer, span.name(), &span.extensions())?;
            writer.write_str(",\"spans\":[")?;
            if let Some(leaf) = ctx.lookup_current() {
                for (i, span) in leaf.scope().from_root().enumerate() {
                    if i > 0 {
                        writer.write_char(',')?;
                    }
                    write_json_span(&mut writer, span.name(), &span.extensions())?;
                }
            }
            writer.write_char(']')?;
        }
        writer.write_str("}\n")
    }
}

/// A span as a JSON object: its fields, then `"name"`.
fn write_json_span(writer: &mut Writer<'_>, name: &str, extensions: &Extensions<'_>) -> fmt::Result {
    let stored = extensions.get::<FormattedFields<JsonFields>>().map(|f| f.fields.as_str());
    let body = stored.and_then(|s| s.strip_prefix('{')?.strip_suffix('}')).unwrap_or("");
    writer.write_char('{')?;
    writer.write_str(body)?;
    if !body.is_empty() {
        writer.write_char(',')?;
    }
    writer.write_str("\"name\":")?;
    write_json_str(writer, name)?;
    writer.write_char('}')
}

/// The event's fields as the members of a JSON object, in the order they were given: strings,
/// `Debug` values, errors and bytes as JSON strings; integers, floats and booleans as JSON
/// numbers and literals.
struct JsonEventFields<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl<'a> JsonEventFields<'a> {
    /// Writes the separator and the field's name, and returns the writer for its value.
    fn key(&mut self, field: &Field) -> Option<&mut Writer<'a>> {
        if self.result.is_err() {
            return None;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(',');
        }
        self.result = self.result.and_then(|()| {
            write_json_str(&mut self.writer, field.name())?;
            self.writer.write_char(':')
        });
        self.result.is_ok().then_some(&mut self.writer)
    }
}

impl Visit for JsonEventFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(writer) = self.key(field) {
            self.result = write_json_str(writer, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(writer) = self.key(field) {
            self.result = write_u64(writer, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Some(writer) = self.key(field) {
            self.result = write_i64(writer, value);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if let Some(writer) = self.key(field) {
            // serde_json's shortest form, and `null` for what JSON cannot hold.
            let text = serde_json::to_string(&value).map_err(|_| fmt::Error);
            self.result = text.and_then(|text| writer.write_str(&text));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if let Some(writer) = self.key(field) {
            self.result = writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if let Some(writer) = self.key(field) {
            let open = writer.write_char('"');
            let text = open.and_then(|()| write!(JsonEscaped(writer), "{value:?}"));
            self.result = text.and_then(|()| writer.write_char('"'));
        }
    }
}

/// A JSON string: quoted, and escaped as serde_json escapes it.
fn write_json_str(writer: &mut Writer<'_>, value: &str) -> fmt::Result {
    writer.write_char('"')?;
    JsonEscaped(writer).write_str(value)?;
    writer.write_char('"')
}

/// Writes through to the line, escaping what a JSON string may not hold as it is, the way
/// serde_json does: `"` and `\`, the control characters that have a short escape (`\b`, `\t`,
/// `\n`, `\f`, `\r`), and the other control characters as `\u00xx`. Everything else, DEL and
/// non-ASCII included, is written unchanged.
struct JsonEscaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for JsonEscaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut clean = 0;
        let mut i = 0;
        while i < bytes.len() {
            // A table lookup per byte: the common case, a run of bytes that need nothing.
            if !JSON_ESCAPES[usize::from(bytes[i])] {
                i += 1;
                continue;
            }
            // Escaped bytes are ASCII, so the cuts fall between characters.
            self.0.write_str(&s[clean..i])?;
            match bytes[i] {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                0x08 => self.0.write_str("\\b")?,
                0x0c => self.0.write_str("\\f")?,
                byte => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.0.write_str("\\u00")?;
                    self.0.write_char(HEX[usize::from(byte >> 4)].into())?;
                    self.0.write_char(HEX[usize::from(byte & 0xf)].into())?;
                }
            }
            i += 1;
            clean = i;
        }
        self.0.write_str(&s[clean..])
    }
}

/// The bytes a JSON string escapes: the control characters, `"` and `\`.
const JSON_ESCAPES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

//! The JSON log line, written straight into the line buffer.
//!
//! The shape is tracing-subscriber's `json().flatten_event(true)
//! .with_current_span(true).with_span_list(false)`: `timestamp`, `level`,
//! the event's fields (`message` among them), `target`, and `span` with the
//! current span's fields and `name`. Its formatter costs about a tenth of a
//! request's CPU here: it goes through serde_json and an `io`-to-`fmt`
//! adaptor for every field and parses the span's fields back from text for
//! every event. This one escapes strings in runs and copies the span's
//! fields as they were formatted (`JsonFields`, once per span). The unit
//! tests check that both produce the same JSON.

use std::fmt::{self, Write as _};
use std::time::SystemTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON event formatter (pair it with `JsonFields` for span fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(
            w,
            "{{\"timestamp\":\"{}\",\"level\":\"{}\"",
            humantime::format_rfc3339_micros(SystemTime::now()),
            meta.level()
        )?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            w.write_str(",\"span\":{")?;
            let ext = span.extensions();
            // `JsonFields` wrote the span's fields as one JSON object.
            let inner = ext
                .get::<FormattedFields<JsonFields>>()
                .map(|f| f.fields.trim())
                .and_then(|f| f.strip_prefix('{')?.strip_suffix('}'))
                .unwrap_or("");
            if !inner.trim().is_empty() {
                w.write_str(inner)?;
                w.write_char(',')?;
            }
            w.write_str("\"name\":")?;
            string(&mut w, span.name())?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_char(',')?;
        // Raw identifiers (`r#type`) are logged without the prefix.
        let name = field.name();
        string(self.w, name.strip_prefix("r#").unwrap_or(name))?;
        self.w.write_char(':')
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.w));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| string(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json writes a non-finite float as null.
        self.put(field, |w| {
            if value.is_finite() {
                write!(w, "{value:?}")
            } else {
                w.write_str("null")
            }
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |w| string(w, &value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| {
            // `message` (and `%` fields) arrive here: a plain `format_args!`
            // is copied without a temporary string.
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// A writer that escapes what goes through it for a JSON string, copying the
/// runs that need no escape at once.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            // `i` is at an ASCII byte, so both slices are on char boundaries.
            self.0.write_str(&s[start..i])?;
            if esc.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(esc)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Thing {
        #[allow(dead_code)]
        name: &'static str,
    }

    /// Events of every field kind, inside and outside spans.
    fn events() {
        let err = io::Error::other("disk \"full\"\n");
        tracing::info!(
            request_id = 7u64,
            delta = -3i64,
            ok = true,
            ratio = 0.25f64,
            nan = f64::NAN,
            method = "GET",
            path = "/api/v4/\"quoted\"\\back\tslash\u{1}ünï",
            error = Option::<&str>::None,
            thing = ?Thing { name: "a\"b" },
            shown = %"display \n text",
            cause = &err as &(dyn std::error::Error + 'static),
            r#type = "raw",
            "request {} done", 3
        );
        let outer = tracing::info_span!("agent", connection = "acme", instance = "i-1");
        outer.in_scope(|| {
            tracing::warn!(code = 5u64, "inside \"the\" span");
            let bare = tracing::info_span!("bare");
            bare.in_scope(|| tracing::error!("in a span without fields"));
        });
    }

    fn lines(sub: impl Subscriber + Send + Sync + 'static, buf: &Buf) -> Vec<Value> {
        tracing::subscriber::with_default(sub, events);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                let ts = v.as_object_mut().unwrap().remove("timestamp").unwrap();
                humantime::parse_rfc3339(ts.as_str().unwrap()).unwrap();
                v
            })
            .collect()
    }

    #[test]
    fn lines_are_those_of_tracing_subscribers_json_format() {
        let theirs = Buf::default();
        let reference = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(theirs.clone())
            .finish();
        let ours = Buf::default();
        let fast = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(ours.clone())
            .finish();
        let expected = lines(reference, &theirs);
        let got = lines(fast, &ours);
        assert_eq!(expected.len(), 3);
        assert_eq!(got, expected);
        // The cases the comparison is about are really there.
        assert_eq!(got[0]["path"], "/api/v4/\"quoted\"\\back\tslash\u{1}ünï");
        assert_eq!(got[0]["message"], "request 3 done");
        assert_eq!(got[0]["type"], "raw");
        assert_eq!(got[1]["span"]["connection"], "acme");
        assert_eq!(got[2]["span"]["name"], "bare");
    }
}

//! Tracing setup with a level that can change on reload.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber writing to `writer` (stderr for the binary, a capture buffer
/// in tests). Later calls are no-ops.
pub fn init<W>(level: &str, format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    init_with(level, format, writer, false);
}

/// The level names a directive without `=` must be (case-insensitive).
pub const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses `[log] level`: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or a
/// comma-separated `EnvFilter` directive list such as `warn,sealgate=debug`.
///
/// Stricter than `EnvFilter`: a directive without `=` must be a level name. `EnvFilter` reads
/// any other bare word as a *target* to log at every level, so the typo `warning` would turn
/// all other logging off (start-up line included) without a word. It also works around two
/// problems in tracing-subscriber's parser (both found by the `config_parse` fuzz target):
///
/// - field values are matched literally, not as regexes: a crafted `[span{field=…}]` value
///   otherwise compiles into a DFA for a minute or more, at startup and on every reload;
/// - each comma-separated directive is trimmed and the list must be ASCII: the parser slices
///   the untrimmed directive with offsets from the trimmed one, so `info, sealgate=debug` got
///   the target ` sealgat`, and a non-ASCII character after such a space panicked.
///
/// # Errors
/// Non-ASCII or empty input, a bare word that is not a level, or a directive that does not
/// parse.
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    if !level.is_ascii() {
        return Err("log filter directives must be ASCII".into());
    }
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("empty log level".into());
    }
    if let Some(bad) = directives.iter().find(|d| !is_level_or_assignment(d)) {
        return Err(format!(
            "'{bad}' is not a level ({}) or a target=level directive",
            LEVELS.join(", ")
        ));
    }
    let mut list = directives.join(",");
    for target in CAPPED {
        if !directives.iter().any(|d| names(d, target)) {
            list.push_str(&format!(",{target}=info"));
        }
    }
    for (module, lifted_by) in QUIETED {
        if !directives
            .iter()
            .any(|d| names(d, module) || names(d, lifted_by))
        {
            list.push_str(&format!(",{module}=error"));
        }
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(list)
        .map_err(|e| format!("'{level}' is not a valid directive list: {e}"))
}

/// Crates held at `info` unless a directive names exactly that crate (`h2=debug`: the operator
/// asks for frames, values and all). At debug, h2 logs whole frames — a GOAWAY's debug data
/// verbatim, which an upstream holding a real value controls — and hyper and hyper-util log
/// h2 errors, whose `Display` carries that data. At debug, tokio_postgres logs every
/// statement's parameters: sealed secret rows, sealed snapshots, proxy-token hashes (never a
/// plaintext value, but nothing an operator asked for; outside re-check). A directive for a
/// module inside one (say `h2::hpack=warn`) does not lift the cap of the rest.
const CAPPED: [&str; 4] = ["h2", "hyper", "hyper_util", "tokio_postgres"];

/// Modules held at `error` unless a directive names the module or its crate: a sandbox
/// makes them warn as often as it likes, in lines that do not name it.
/// - h2's `ping_pong` warns "recv PING ack that we never sent" for every unsolicited PING
///   ACK, a 17-byte frame a sandbox may repeat as fast as it can write (review h48c);
/// - h2's `streams` warns when a connection reaches its reset limits (51 streams reset before
///   they were accepted, or 257 stream errors), once per connection, which a sandbox may open
///   as fast as it can handshake (review h48d). The connection still ends with GOAWAY
///   `ENHANCE_YOUR_CALM`.
const QUIETED: [(&str, &str); 2] = [("h2::proto::ping_pong", "h2"), ("h2::proto::streams", "h2")];

fn names(directive: &str, target: &str) -> bool {
    directive
        .strip_prefix(target)
        .is_some_and(|rest| rest.starts_with('='))
}

fn is_level_or_assignment(directive: &str) -> bool {
    directive.contains('=') || LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive))
}

/// Logs to stderr, with colours only when stderr is a terminal.
pub fn init_stderr(level: &str, format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_with(level, format, std::io::stderr, ansi);
}

fn init_with<W>(level: &str, format: LogFormat, writer: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = parse_filter(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
    };
    if result.is_ok() {
        let _ = HANDLE.set(handle);
    }
}

/// Changes the level of the installed subscriber (reload). Invalid directives are ignored
/// (config validation already rejected them).
pub fn set_level(level: &str) {
    if let (Some(h), Ok(f)) = (HANDLE.get(), parse_filter(level)) {
        let _ = h.reload(f);
    }
}

#[cfg(test)]
mod tests {
    /// An upstream writes GOAWAY debug data; h2 logs it at debug. `debug` keeps h2 at info.
    #[test]
    fn debug_level_keeps_h2_frames_out_of_the_log() {
        use tracing::level_filters::LevelFilter;
        let f = super::parse_filter("debug").unwrap().to_string();
        assert!(f.contains("h2=info"), "{f}");
        let f = super::parse_filter("warn,h2=debug").unwrap().to_string();
        assert!(!f.contains("h2=info") && f.contains("h2=debug"), "{f}");
        let f = super::parse_filter("info,h2::proto=trace")
            .unwrap()
            .to_string();
        assert!(
            f.contains("h2=info"),
            "a module directive keeps the rest capped: {f}"
        );
        let f = super::parse_filter("debug").unwrap().to_string();
        assert!(
            f.contains("hyper=info")
                && f.contains("hyper_util=info")
                && f.contains("tokio_postgres=info"),
            "{f}"
        );
        assert!(super::parse_filter("debug").unwrap().max_level_hint() >= Some(LevelFilter::DEBUG));
    }

    /// A sandbox may send unsolicited PING ACKs as fast as it writes; h2 warns once per
    /// frame. That module stays at `error` unless the operator names it or h2.
    #[test]
    fn h2s_per_frame_warning_is_quiet_unless_asked_for() {
        let f = super::parse_filter("info").unwrap().to_string();
        assert!(f.contains("h2::proto::ping_pong=error"), "{f}");
        assert!(f.contains("h2::proto::streams=error"), "{f}");
        for asked in ["info,h2=debug", "info,h2::proto::ping_pong=warn"] {
            let f = super::parse_filter(asked).unwrap().to_string();
            assert!(!f.contains("ping_pong=error"), "{asked}: {f}");
        }
    }

    /// Regression (fuzz `config_parse`): this directive took ~50 s of CPU with regex field
    /// matching.
    #[test]
    fn crafted_field_filter_parses_quickly() {
        let level = "inf{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{Z}[ZZZZZZZZZZZZZ{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{olisvuuuuuumader_bys = uuuuuuu!!!!!!!!!!!!!!!#!!!!!!!!+!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!..........................................................................................uuuuuutuuuuuuuuumader_bys !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!uuuuuuuuuuuuuuuutuuuuuuuuumader_bys [sandbox]= ''76'p._.mhma'XZZZtuuuuuuuuumader_bys = '''0'p._.mhma'XZZZZZZZZZZ}[ZZZZZZZZZZZZZ{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{olisvuuuuuumader_bys{{{{{{{{{{{{{{{xy]       ";
        // The input must be ASCII, or `parse_filter` rejects it before the directive parser
        // (the code under test) ever runs.
        assert!(level.is_ascii());
        let start = std::time::Instant::now();
        let _ = super::parse_filter(level);
        // Generous bound (the regex-compiling parser took far longer); catches a hang, not a
        // slow machine.
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        assert!(super::parse_filter("info,sealgate=debug").is_ok());
    }

    /// A bare word that is not a level is refused: `EnvFilter` would read `warning` as a
    /// target and silently log nothing else.
    #[test]
    fn bare_words_must_be_levels() {
        for bad in [
            "warning",
            "information",
            "sealgate",
            "info,verbose",
            "",
            " , ",
        ] {
            assert!(super::parse_filter(bad).is_err(), "{bad:?}");
        }
        let err = super::parse_filter("warning").unwrap_err();
        assert!(err.contains("'warning' is not a level"), "{err}");
        for good in [
            "warn",
            "INFO",
            "off",
            "error,sealgate=debug",
            "sealgate::proxy=trace",
        ] {
            assert!(super::parse_filter(good).is_ok(), "{good:?}");
        }
    }

    /// Regression (fuzz `config_parse`): a space after a comma shifted the parser's offsets
    /// (a panic inside a non-ASCII character, a wrong target otherwise).
    #[test]
    fn spaces_after_commas_and_non_ascii_are_handled() {
        assert!(super::parse_filter("infol[upstream]  ,     on_di\u{389}sall[upmetr]sa").is_err());
        let f = super::parse_filter("warn, sealgate=debug").unwrap();
        assert!(f.to_string().contains("sealgate=debug"), "{f}");
    }
}

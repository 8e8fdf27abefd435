//! `sealgate sandbox exec` (run a command in an isolated sandbox: a thin client of the
//! daemon's `"isolation": "netns"` sandboxes and their commands route) and `sealgate sandbox
//! rules` (print a sandbox's rule set).
//!
//! exec creates the sandbox through the admin API, runs `CMD ARGS…` (shell-quoted into one
//! `sh -c` line) with `Accept: text/event-stream`, copies its output to this terminal as it
//! comes, and returns its exit code (128 + signal when it was killed, 124 when its timeout
//! ended it). The sandbox is deleted on every way out: CMD exits, Ctrl-C, SIGTERM, SIGHUP, a
//! lost connection. The daemon owns namespace, rules, DNS responder, transparent listener and
//! processes, so nothing here needs root, a transparent port or a config file; a client
//! killed with SIGKILL leaves a sandbox that the daemon ends at its `--timeout`.

use std::path::Path;

use anyhow::Context as _;
use clap::Args;
use http::Method;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::client::{AdminClient, ClientError};
use crate::config::Config;
use crate::netns::record::Record;
use crate::netns::rules::shell_line;
use crate::netns::{Plan, RuleParams, RuleSet};

/// Default transparent port for `sandbox rules` when neither the flag nor the config names one.
const DEFAULT_TRANSPARENT_PORT: u16 = 3129;

/// `sealgate sandbox exec` options.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Store name or id.
    #[arg(long)]
    pub store: String,
    /// Sandbox lifetime in seconds, and CMD's timeout (default: the daemon's defaults, the
    /// command's timeout then being the sandbox's lifetime).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print what was set up (namespace, addresses, sandbox id) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub run: CmdArgs,
}

/// `sealgate sandbox run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Sandbox id (a sandbox created with `--isolation netns`).
    pub id: String,
    /// CMD's timeout in seconds (default: what is left of the sandbox's lifetime).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub run: CmdArgs,
}

/// The command of `sandbox exec` and `sandbox run`, and how its input and output pass.
#[derive(Debug, Args)]
pub struct CmdArgs {
    /// Forward this process's stdin to CMD: read to its end before anything is sent (UTF-8
    /// text, at most 512 KiB — the commands API carries it as a JSON string).
    #[arg(long = "stdin", short = 'i')]
    pub stdin: bool,
    /// Copy CMD's output as the daemon sent it (UTF-8 text; bytes that were not UTF-8 arrive
    /// as U+FFFD) even to a terminal. Without it, on a terminal, control characters other than
    /// newline, tab and carriage return, and bidi and zero-width characters, are shown escaped
    /// (`\x1b`, `\u{202e}`), all non-ASCII too outside a UTF-8 locale: the output is the
    /// sandbox's, and escape sequences can retitle the terminal, clear it or write the
    /// clipboard.
    #[arg(long)]
    pub raw: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub cmd: Vec<String>,
}

/// `sealgate sandbox rules` options.
#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Sandbox id.
    pub id: String,
    /// Host-side interface the sandbox's traffic arrives on. Required for a sandbox of your
    /// own runtime (your veth); the default covers only the daemon's own isolated and
    /// `sandbox exec` sandboxes, whose interface it derives from the source IP.
    #[arg(long)]
    pub interface: Option<String>,
    /// The transparent listener port (default: the isolated sandbox's own listener, else
    /// `[proxy] transparent_listen` of --config, else 3129).
    #[arg(long, env = "SEALGATE_TRANSPARENT_PORT")]
    pub transparent_port: Option<u16>,
    /// Port of a DNS responder to REDIRECT UDP/TCP 53 to (default: the isolated sandbox's,
    /// else none: DNS is dropped like all other UDP).
    #[arg(long)]
    pub dns_port: Option<u16>,
    /// Omit the ip6tables rules.
    #[arg(long)]
    pub no_ipv6: bool,
}

fn transparent_port(flag: Option<u16>, config: Option<&Path>) -> anyhow::Result<u16> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let cfg = Config::load(config).context("loading the config for [proxy] transparent_listen")?;
    Ok(cfg
        .proxy
        .transparent_listen
        .map(|a| a.port())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_TRANSPARENT_PORT))
}

/// Runs `sandbox exec`; returns CMD's exit code. The sandbox is deleted before it returns.
///
/// # Errors
/// The daemon refusing the sandbox or the command (nothing is left behind then).
pub async fn exec(c: &AdminClient, a: &ExecArgs) -> anyhow::Result<i32> {
    let mut signals = Signals::new()?;
    let input = a.run.input().await?;
    let mut body = json!({"secret_store": a.store, "isolation": "netns"});
    if let Some(t) = a.timeout {
        body["timeout"] = json!(t);
    }
    let sandbox = c
        .call(Method::POST, "/v1/sandboxes", Some(body))
        .await
        .context("creating an isolated sandbox")?;
    let id = sandbox["id"].as_str().unwrap_or_default().to_owned();
    if a.verbose {
        describe(&sandbox);
    }
    let code = run_or_signal(c, &sandbox, &a.run, a.timeout, input, &mut signals).await;
    end_sandbox(c, &id).await;
    code
}

/// Runs `sandbox run`: CMD in an existing isolated sandbox, which is left running; returns
/// CMD's exit code (128 + signal when this client was stopped: the daemon kills a command
/// whose client went away).
///
/// # Errors
/// No such sandbox, or the daemon refusing the command (409 for a sandbox without `netns`).
pub async fn run_in(c: &AdminClient, a: &RunArgs) -> anyhow::Result<i32> {
    let mut signals = Signals::new()?;
    let input = a.run.input().await?;
    let path = format!("/v1/sandboxes/{}", super::client::seg(&a.id));
    let sandbox = c
        .call(Method::GET, &path, None)
        .await
        .with_context(|| format!("finding sandbox {}", a.id))?;
    run_or_signal(c, &sandbox, &a.run, a.timeout, input, &mut signals).await
}

impl CmdArgs {
    /// This process's stdin when `--stdin` asks for it, read to its end before anything is
    /// sent ([`read_stdin`]).
    async fn input(&self) -> anyhow::Result<Option<String>> {
        match self.stdin {
            true => Ok(Some(read_stdin().await?)),
            false => Ok(None),
        }
    }
}

/// [`run`], or 128 + the signal that stops this client first.
async fn run_or_signal(
    c: &AdminClient,
    sandbox: &Value,
    a: &CmdArgs,
    timeout: Option<u64>,
    input: Option<String>,
    signals: &mut Signals,
) -> anyhow::Result<i32> {
    tokio::select! {
        r = run(c, sandbox, &a.cmd, timeout, input, Output::new(a.raw)) => r,
        sig = signals.recv() => Ok(128 + sig),
    }
}

fn describe(sb: &Value) {
    let n = &sb["netns"];
    super::say(format_args!(
        "sealgate: sandbox {} in namespace {} ({} via {} on {})",
        sb["id"].as_str().unwrap_or("?"),
        n["name"].as_str().unwrap_or("?"),
        n["address"].as_str().unwrap_or("?"),
        n["gateway"].as_str().unwrap_or("?"),
        n["interface"].as_str().unwrap_or("?"),
    ));
}

/// Deletes the sandbox, once more on a new connection if the first try could not be sent (a
/// pooled connection the daemon had just closed: an outside re-check left a sandbox behind).
async fn end_sandbox(c: &AdminClient, id: &str) {
    let path = format!("/v1/sandboxes/{id}");
    let mut answer = c.call(Method::DELETE, &path, None).await;
    if matches!(answer, Err(ClientError::Transport(..))) {
        answer = c.call(Method::DELETE, &path, None).await;
    }
    match answer {
        Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => super::say(format_args!(
            "sealgate: warning: could not end sandbox {id}: {e}"
        )),
    }
}

/// Runs CMD through the commands route and copies its output here; returns its exit code.
async fn run(
    c: &AdminClient,
    sandbox: &Value,
    cmd: &[String],
    timeout: Option<u64>,
    stdin: Option<String>,
    output: Output,
) -> anyhow::Result<i32> {
    let id = sandbox["id"].as_str().unwrap_or_default();
    let secs = timeout.unwrap_or_else(|| remaining_secs(sandbox)).max(1);
    let mut body = json!({"cmd": shell_line(cmd), "timeout": secs});
    if let Some(input) = stdin {
        body["stdin"] = json!(input);
    }
    let resp = c
        .post_stream(&format!("/v1/sandboxes/{id}/commands"), &body)
        .await
        .context("starting the command")?;
    let mut body = resp.into_body();
    let mut events = SseParser::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the command's output")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for (event, data) in events.push(data) {
            if let Some(code) = output.show(&event, &data)? {
                return Ok(code);
            }
        }
    }
    anyhow::bail!("the daemon closed the command's output stream without an exit event")
}

/// Most stdin `--stdin` forwards, before escaping: the admin API takes bodies up to 1 MiB,
/// and escaped as a JSON string the text grows ([`fits_a_request`] measures that).
const MAX_STDIN: u64 = 512 * 1024;

/// Reads stdin to its end (`--stdin`): UTF-8, at most [`MAX_STDIN`] bytes.
async fn read_stdin() -> anyhow::Result<String> {
    tokio::task::spawn_blocking(|| {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
        anyhow::ensure!(
            bytes.len() as u64 <= MAX_STDIN,
            "--stdin forwards at most {} KiB; stdin is longer",
            MAX_STDIN / 1024
        );
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("--stdin forwards UTF-8 text only; stdin is not UTF-8"))?;
        fits_a_request(&text)?;
        Ok(text)
    })
    .await?
}

/// The most a command's stdin may take escaped as a JSON string: the admin API's 1 MiB body
/// limit, less room for the rest of the request.
const MAX_STDIN_ESCAPED: usize = 1024 * 1024 - 64 * 1024;

/// Refuses stdin whose JSON escaping outgrows a request before any sandbox is made: control
/// characters escape to six bytes each (`\u0001`), so 512 KiB of them passed the length check
/// and met the daemon's 413 (outside re-check).
fn fits_a_request(text: &str) -> anyhow::Result<()> {
    let escaped = serde_json::to_string(text).map_or(usize::MAX, |s| s.len());
    anyhow::ensure!(
        escaped <= MAX_STDIN_ESCAPED,
        "--stdin is {} KiB once escaped for the admin API (control characters take 6 bytes \
         each), over its {} KiB",
        escaped / 1024,
        MAX_STDIN_ESCAPED / 1024
    );
    Ok(())
}

/// Where CMD's output goes: escaped on a terminal unless `--raw` ([`defanged`]).
struct Output {
    escape_out: bool,
    escape_err: bool,
    /// The locale is UTF-8: non-ASCII text may be shown as it is.
    utf8: bool,
}

impl Output {
    fn new(raw: bool) -> Output {
        use std::io::IsTerminal as _;
        Output {
            escape_out: !raw && std::io::stdout().is_terminal(),
            escape_err: !raw && std::io::stderr().is_terminal(),
            utf8: utf8_locale(),
        }
    }

    /// Copies one event to stdout/stderr; Some(exit code) for the `exit` event.
    fn show(&self, event: &str, data: &str) -> anyhow::Result<Option<i32>> {
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let text = v["data"].as_str().unwrap_or_default();
        match event {
            "stdout" => copy(std::io::stdout().lock(), text, self.escape_out, self.utf8)?,
            "stderr" => copy(std::io::stderr().lock(), text, self.escape_err, self.utf8)?,
            _ => return Ok(exit_code(event, &v)),
        }
        Ok(None)
    }
}

fn copy(mut to: impl std::io::Write, text: &str, escape: bool, utf8: bool) -> std::io::Result<()> {
    if escape {
        to.write_all(defanged(text, utf8).as_bytes())?;
    } else {
        to.write_all(text.as_bytes())?;
    }
    to.flush()
}

/// Whether the locale's character set is UTF-8 (`LC_ALL`, else `LC_CTYPE`, else `LANG`).
fn utf8_locale() -> bool {
    let set = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    set.contains("utf-8") || set.contains("utf8")
}

/// Bidi embeddings, overrides and isolates, zero-width characters and the BOM: shown, they
/// reorder or hide what is around them.
fn hides_text(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// `text` with every control character but newline, tab and carriage return, and every
/// character that hides text ([`hides_text`]), written as a visible escape (`\x1b`,
/// `\u{9b}`), and outside a UTF-8 locale (`utf8` false) every non-ASCII character too: a
/// terminal then shows what the sandbox sent instead of obeying it.
fn defanged(text: &str, utf8: bool) -> std::borrow::Cow<'_, str> {
    let keep = |c: char| {
        (!c.is_control() || matches!(c, '\n' | '\t' | '\r'))
            && !hides_text(c)
            && (utf8 || c.is_ascii())
    };
    if text.chars().all(keep) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if keep(c) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The exit code an `exit` event carries (saying so when the timeout ended the command).
fn exit_code(event: &str, v: &Value) -> Option<i32> {
    match event {
        "exit" => {
            if v["timed_out"] == true {
                super::say(format_args!(
                    "sealgate: the command's timeout ran out; it was killed"
                ));
            }
            let code = v["exit_code"].as_i64().unwrap_or(1);
            Some(i32::try_from(code).unwrap_or(1))
        }
        _ => None,
    }
}

/// Incremental `text/event-stream` parser: `event:` and `data:` lines, events end at a
/// blank line.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feeds bytes; returns the complete events (name, data).
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let (mut event, mut data) = ("message".to_owned(), String::new());
            for line in text.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            out.push((event, data));
        }
        out
    }
}

/// Seconds until the sandbox's `expires_at` (an hour when it cannot be read).
fn remaining_secs(sandbox: &Value) -> u64 {
    let fmt = time::format_description::well_known::Rfc3339;
    sandbox["expires_at"]
        .as_str()
        .and_then(|t| time::OffsetDateTime::parse(t, &fmt).ok())
        .map(|at| (at - time::OffsetDateTime::now_utc()).whole_seconds())
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(3600)
}

/// SIGINT, SIGTERM and SIGHUP, caught from the start so no signal skips cleanup.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Prints a sandbox's rule set: exactly the one in force when a `sandbox exec` on this host
/// owns the sandbox, else generated from the sandbox's `source_ip` and the flags.
///
/// # Errors
/// Unknown sandbox, no `source_ip`, or no interface to name.
pub async fn rules(c: &AdminClient, a: &RulesArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let params = match Record::all()
        .into_iter()
        .find(|r| r.sandbox_id.as_deref() == Some(a.id.as_str()))
        .and_then(|r| r.rules)
    {
        Some(p) => p,
        None => rule_params(c, a, config).await?,
    };
    let set = RuleSet::generate(&params)?;
    super::commands::emit(format_args!(
        "# sealgate rule set for {} (interface {}, source {}, transparent port {}, dns port {})\n{}",
        params.sandbox_id,
        params.host_if,
        params.sandbox_ip,
        params.transparent_port,
        params.dns_port.map_or("none".into(), |p| p.to_string()),
        set.to_string().trim_end_matches('\n'),
    ));
    Ok(())
}

async fn rule_params(
    c: &AdminClient,
    a: &RulesArgs,
    config: Option<&Path>,
) -> anyhow::Result<RuleParams> {
    let sb = c
        .call(Method::GET, &format!("/v1/sandboxes/{}", a.id), None)
        .await?;
    let ip: std::net::Ipv4Addr = sb["source_ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "sandbox {} has no IPv4 source_ip (transparent mode identifies sandboxes by it)",
                a.id
            )
        })?;
    let plan = Plan::for_ns_ip(ip).filter(|_| a.interface.is_none());
    let host_if = a
        .interface
        .clone()
        .or_else(|| plan.as_ref().map(|p| p.host_if.clone()))
        .ok_or_else(|| anyhow::anyhow!("give --interface (the host side of the sandbox's veth): {ip} is not an address of the daemon's own isolated or `sandbox exec` sandboxes"))?;
    Ok(RuleParams {
        sandbox_id: a.id.clone(),
        host_if,
        sandbox_ip: ip,
        host_ip: plan.map(|p| p.host_ip),
        transparent_port: transparent_port(a.transparent_port, config)?,
        dns_port: a.dns_port,
        ipv6: !a.no_ipv6,
        flows: Some(
            Config::load(config)
                .context("loading the config for [sandbox] max_flows")?
                .sandbox
                .flows,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_is_measured_as_the_request_carries_it() {
        let limit = MAX_STDIN as usize;
        assert!(fits_a_request(&"a".repeat(limit)).is_ok());
        assert!(
            fits_a_request(&"\"".repeat(400_000)).is_ok(),
            "doubled: 800 KB"
        );
        assert!(
            fits_a_request(&"\"".repeat(limit)).is_err(),
            "doubled: over 1 MiB"
        );
        let err = fits_a_request(&"\u{1}".repeat(limit))
            .unwrap_err()
            .to_string();
        assert!(err.contains("6 bytes"), "{err}");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(defanged("plain\ttext\r\n", true), "plain\ttext\r\n");
        let hostile = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{7f}é";
        assert_eq!(
            defanged(hostile, true),
            "\\x1b]0;pwned\\x07\\x1b[2J\\u{9b}31m\\x7fé"
        );
        // Bidi overrides and zero-width characters would hide or reorder what is shown.
        assert_eq!(
            defanged("a\u{202e}b\u{200b}c\u{2066}\u{feff}", true),
            "a\\u{202e}b\\u{200b}c\\u{2066}\\u{feff}"
        );
        // Outside a UTF-8 locale every non-ASCII character is escaped: a terminal obeying
        // 8-bit controls reads the byte 0x9b of `Û` (C3 9B) as CSI.
        assert_eq!(defanged("Û2J é", false), "\\u{db}2J \\u{e9}");
    }

    #[test]
    fn sse_events_are_parsed_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: stdout\ndata: {\"data\":\"a\"}").is_empty());
        let got = p.push(b"\n\nevent: exit\ndata: {\"exit_code\":3}\n\n");
        assert_eq!(
            got,
            [
                ("stdout".to_owned(), "{\"data\":\"a\"}".to_owned()),
                ("exit".to_owned(), "{\"exit_code\":3}".to_owned())
            ]
        );
    }
}

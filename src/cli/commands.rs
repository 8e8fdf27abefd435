//! Client subcommands: turn CLI arguments into admin API calls and print the answers.

use std::io::{IsTerminal, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::Method;
use serde_json::{json, Value};

use super::client::{seg, AdminClient};
use super::{Cli, Command, CreateArgs, SandboxCmd, SecretCmd, StoreCmd};
use crate::config::Config;

/// Runs a client command. Returns the process exit code.
///
/// # Errors
/// Any failure, as a message for stderr.
pub async fn run_client(cli: &Cli, cfg: &Config) -> anyhow::Result<()> {
    let client = connect(cli, cfg)?;
    let out = match &cli.command {
        Command::Store(c) => store(&client, c).await?,
        Command::Secret(c) => secret(&client, c).await?,
        Command::Sandbox(SandboxCmd::Exec(a)) => {
            let code = super::exec::exec(&client, a).await?;
            std::process::exit(code)
        }
        Command::Sandbox(SandboxCmd::Run(a)) => {
            let code = super::exec::run_in(&client, a).await?;
            std::process::exit(code)
        }
        Command::Sandbox(SandboxCmd::Rules(a)) => {
            return super::exec::rules(&client, a, cli.config.as_deref()).await
        }
        Command::Sandbox(c) => return sandbox(&client, c, cli.json).await,
        _ => anyhow::bail!("not a client command"),
    };
    warn(&out);
    print(&out, cli.json);
    Ok(())
}

/// Prints an answer's `warnings` (e.g. a secret that can never be unsealed) to stderr.
fn warn(answer: &Value) {
    let warnings = answer["warnings"].as_array().into_iter().flatten();
    for w in warnings.filter_map(Value::as_str) {
        super::say(format_args!("sealgate: warning: {w}"));
    }
}

/// The admin URL the config's `[admin] listen` serves (`http://127.0.0.1:7070` by default);
/// a wildcard listen address is reached over loopback.
pub fn default_admin_url(cfg: &Config) -> String {
    let mut addr = cfg.admin_listen;
    if addr.ip().is_unspecified() {
        let lo = match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        addr.set_ip(lo);
    }
    format!("http://{addr}")
}

fn connect(cli: &Cli, cfg: &Config) -> anyhow::Result<AdminClient> {
    let url = cli
        .admin_url
        .clone()
        .unwrap_or_else(|| default_admin_url(cfg));
    check_admin_url(&url)?;
    let token = match &cli.admin_token {
        Some(t) => t.clone(),
        None => read_token(&cfg.data_dir.join("admin.token"))?,
    };
    Ok(AdminClient::new(&url, token))
}

/// The admin API is plain HTTP on loopback: `http://host:port`.
fn check_admin_url(url: &str) -> anyhow::Result<()> {
    let ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
    anyhow::ensure!(
        ok,
        "--admin-url / SEALGATE_ADMIN_URL '{url}' is not an http://host:port URL"
    );
    Ok(())
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    // A regular file only, as the daemon reads it: a FIFO hung the command, a link to
    // /dev/zero read until memory ran out (outside re-check).
    let read = crate::fsutil::open_regular(path).and_then(|mut f| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(&mut f, 64 * 1024), &mut text)
            .map(|_| text)
    });
    let text = read.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the admin token {} ({e}): start `sealgate serve` with the same \
             --config / --data-dir first, or pass --admin-token / SEALGATE_ADMIN_TOKEN",
            path.display()
        )
    })?;
    Ok(text.trim().to_owned())
}

/// Names on stderr the stores `GET /v1/stores` left out because their rows failed their
/// checks (the daemon's `x-sealgate-corrupt-stores`): a listing that silently lacked them
/// told an operator in an incident that they did not exist.
fn warn_corrupt(headers: &http::HeaderMap) {
    let header = crate::admin::CORRUPT_STORES_HEADER;
    let Some(ids) = headers.get(header).and_then(|v| v.to_str().ok()) else {
        return;
    };
    for id in ids.split(',').map(str::trim).filter(|id| !id.is_empty()) {
        if let Some(more) = id.strip_prefix('+') {
            super::say(format_args!(
                "sealgate: warning: {more} more stores are left out: their rows failed their \
                 integrity checks (the daemon's log names them; see docs/operations.md)"
            ));
            continue;
        }
        super::say(format_args!(
            "sealgate: warning: store {id} is left out: its row failed its integrity checks \
             (`sealgate store get {id}` names the field; see docs/operations.md)"
        ));
    }
}

/// The one wording for a store that does not exist, the daemon's own 404's: a long id or name
/// is not repeated (it could be a value passed in its place; outside pass h38f: the CLI
/// printed it whole where the daemon hid it).
fn no_such_store(id_or_name: &str) -> anyhow::Error {
    let missing = crate::store::Missing::store(id_or_name);
    anyhow::anyhow!("{} not found", crate::admin::unrepeated_names(&missing))
}

/// Store names may not be blank (the API refuses them too; saying so here saves a round trip).
fn check_store_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.trim().is_empty(),
        "store name must not be empty or only whitespace"
    );
    Ok(())
}

/// Resolves a store id or name to its id. An id (no store name is shaped like one: the API
/// refuses such names) is used as given, without the list: a store whose row fails its
/// checks is left out of the list but answered by id (500 `store_corrupt`, and its DELETE is
/// the repair operations.md gives), which a lookup in the list turned into "not found".
async fn store_id(c: &AdminClient, id_or_name: &str) -> anyhow::Result<String> {
    if let Ok(id) = uuid::Uuid::try_parse(id_or_name) {
        return Ok(id.hyphenated().to_string());
    }
    let all = c.call(Method::GET, "/v1/stores", None).await?;
    let found = all
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"] == id_or_name || s["name"] == id_or_name);
    match found {
        Some(s) => Ok(s["id"].as_str().unwrap_or_default().to_owned()),
        None => Err(no_such_store(id_or_name)),
    }
}

fn allowlist(allow: &[String], deny_all: bool) -> Value {
    if deny_all {
        json!([])
    } else if allow.is_empty() {
        Value::Null
    } else {
        json!(allow)
    }
}

async fn store(c: &AdminClient, cmd: &StoreCmd) -> anyhow::Result<Value> {
    Ok(match cmd {
        StoreCmd::Create {
            name,
            allow,
            deny_all,
        } => {
            check_store_name(name)?;
            c.call(
                Method::POST,
                "/v1/stores",
                Some(json!({"name": name, "egress_allowlist": allowlist(allow, *deny_all)})),
            )
            .await?
        }
        StoreCmd::List => {
            let (list, headers) = c.call_with_headers(Method::GET, "/v1/stores", None).await?;
            warn_corrupt(&headers);
            list
        }
        StoreCmd::Get { store } => {
            let id = store_id(c, store).await?;
            c.call(Method::GET, &format!("/v1/stores/{id}"), None)
                .await?
        }
        StoreCmd::Update {
            store,
            name,
            allow,
            unrestricted,
            deny_all,
        } => {
            let id = store_id(c, store).await?;
            let mut body = serde_json::Map::new();
            if let Some(n) = name {
                check_store_name(n)?;
                body.insert("name".into(), json!(n));
            }
            if *unrestricted || *deny_all || !allow.is_empty() {
                body.insert("egress_allowlist".into(), allowlist(allow, *deny_all));
            }
            c.call(
                Method::PATCH,
                &format!("/v1/stores/{id}"),
                Some(Value::Object(body)),
            )
            .await?
        }
        StoreCmd::Delete { store } => {
            let id = store_id(c, store).await?;
            c.call(Method::DELETE, &format!("/v1/stores/{id}"), None)
                .await?;
            json!({"deleted": id})
        }
    })
}

/// Reads a secret value from `--from-env VAR` or stdin — never argv — and drops trailing line
/// ends. An empty value is refused here with a hint (an unset shell variable piped in is the
/// usual cause). A terminal on stdin is refused too: nothing would prompt, and the typed value
/// would be echoed on the screen.
fn read_value(from_env: Option<&str>) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let mut v = match from_env {
        Some(var) => from_env_var(var)?,
        None => from_stdin()?,
    };
    while v.ends_with('\n') || v.ends_with('\r') {
        v.pop();
    }
    if v.is_empty() {
        match from_env {
            Some(var) => anyhow::bail!("--from-env {var}: environment variable {var} is empty"),
            None => anyhow::bail!(
                "the secret value read from stdin is empty (is the variable you piped in set?); \
                 pipe the value in, or use --from-env VAR"
            ),
        }
    }
    Ok(v)
}

fn from_env_var(var: &str) -> anyhow::Result<zeroize::Zeroizing<String>> {
    match std::env::var(var) {
        Ok(v) => Ok(zeroize::Zeroizing::new(v)),
        Err(std::env::VarError::NotPresent) => {
            anyhow::bail!("--from-env {var}: environment variable {var} is not set")
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("--from-env {var}: environment variable {var} is not valid UTF-8")
        }
    }
}

fn from_stdin() -> anyhow::Result<zeroize::Zeroizing<String>> {
    let stdin = std::io::stdin();
    anyhow::ensure!(
        !stdin.is_terminal(),
        "the secret value is read from stdin, which is a terminal: pipe it in \
         (printf %s \"$VALUE\" | sealgate secret set STORE NAME) or use --from-env VAR"
    );
    let mut v = zeroize::Zeroizing::new(String::new());
    stdin
        .lock()
        .read_to_string(&mut v)
        .map_err(|e| anyhow::anyhow!("reading the secret value from stdin: {e}"))?;
    Ok(v)
}

async fn secret(c: &AdminClient, cmd: &SecretCmd) -> anyhow::Result<Value> {
    Ok(match cmd {
        SecretCmd::Set {
            store,
            name,
            from_env,
            allowed_hosts,
            locations,
            stray,
            value_arg,
        } => {
            if !stray.is_empty() || value_arg.is_some() {
                anyhow::bail!(
                    "secret values are never taken from the command line (shell history and \
                     `ps` would keep them; the argument is not repeated here): pipe it in, \
                     `printf %s \"$VALUE\" | sealgate secret set STORE NAME`, or name a variable \
                     with --from-env VAR"
                );
            }
            // The value first: a refused value (empty, unset variable, a terminal) costs no call.
            let value = read_value(from_env.as_deref())?;
            let id = store_id(c, store).await?;
            let mut body = json!({"value": value.as_str()});
            if !allowed_hosts.is_empty() {
                body["allowed_hosts"] = json!(allowed_hosts);
            }
            if !locations.is_empty() {
                let names: Vec<&str> = locations.iter().map(|l| l.as_str()).collect();
                body["locations"] = json!(names);
            }
            // The value leaves this short-lived process once, in the request body; no copy of
            // the JSON is kept around for it.
            c.call(
                Method::PUT,
                &format!("/v1/stores/{id}/secrets/{}", seg(name)),
                Some(body),
            )
            .await?
        }
        SecretCmd::List { store } => {
            let id = store_id(c, store).await?;
            c.call(Method::GET, &format!("/v1/stores/{id}/secrets"), None)
                .await?
        }
        SecretCmd::Delete { store, name } => {
            let id = store_id(c, store).await?;
            c.call(
                Method::DELETE,
                &format!("/v1/stores/{id}/secrets/{}", seg(name)),
                None,
            )
            .await?;
            json!({"deleted": name})
        }
    })
}

async fn sandbox(c: &AdminClient, cmd: &SandboxCmd, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        SandboxCmd::Create(args) => return create_sandbox(c, args, as_json).await,
        SandboxCmd::List => print(&c.call(Method::GET, "/v1/sandboxes", None).await?, as_json),
        SandboxCmd::Get { id } => print(
            &c.call(Method::GET, &format!("/v1/sandboxes/{}", seg(id)), None)
                .await?,
            as_json,
        ),
        SandboxCmd::Delete { id } => {
            c.call(Method::DELETE, &format!("/v1/sandboxes/{}", seg(id)), None)
                .await?;
            print(&json!({"deleted": id}), as_json);
        }
        SandboxCmd::Exec(_) | SandboxCmd::Run(_) | SandboxCmd::Rules(_) => {
            anyhow::bail!("handled by run_client")
        }
    }
    Ok(())
}

async fn create_sandbox(c: &AdminClient, a: &CreateArgs, as_json: bool) -> anyhow::Result<()> {
    let mut body = json!({"secret_store": a.store});
    if let Some(t) = a.timeout {
        body["timeout"] = json!(t);
    }
    if let Some(ip) = a.source_ip {
        body["source_ip"] = json!(ip.to_string());
    }
    if let Some(i) = a.isolation {
        body["isolation"] = json!(i.as_str());
    }
    if !a.envs.is_empty() {
        let envs: serde_json::Map<String, Value> =
            a.envs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        body["envs"] = Value::Object(envs);
    }
    // Checked first: a sandbox whose env file cannot be written is of no use, its proxy
    // password shown only once (outside re-check: each refused attempt left one behind).
    if let Some(path) = &a.env_file {
        crate::fsutil::check_replaceable(path)
            .map_err(|e| anyhow::anyhow!("the env file {}: {e}", path.display()))?;
    }
    let sb = c.call(Method::POST, "/v1/sandboxes", Some(body)).await?;
    let lines = env_lines(&sb);
    if let Some(path) = &a.env_file {
        if let Err(e) = write_env_file(path, &lines) {
            return Err(undo_create(c, &sb, e).await);
        }
    }
    if a.export {
        for (k, v) in &lines {
            emit(format_args!("export {k}={}", shell_quote(v)));
        }
    } else if a.env_file.is_some() && !as_json {
        emit(sb["id"].as_str().unwrap_or_default());
    } else {
        print(&sb, as_json);
    }
    Ok(())
}

/// Deletes a sandbox just created whose env file could not be written, and says so with
/// `why`: nothing else holds its proxy password.
async fn undo_create(c: &AdminClient, sb: &Value, why: anyhow::Error) -> anyhow::Error {
    let id = sb["id"].as_str().unwrap_or_default();
    match c
        .call(Method::DELETE, &format!("/v1/sandboxes/{}", seg(id)), None)
        .await
    {
        Ok(_) => anyhow::anyhow!("{why}; the sandbox {id} was deleted again"),
        Err(e) => anyhow::anyhow!(
            "{why}; deleting the sandbox {id} failed too ({e}): delete it (its proxy password \
             is lost)"
        ),
    }
}

fn env_lines(sb: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in ["env", "proxy_env"] {
        if let Some(m) = sb[key].as_object() {
            out.extend(
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())),
            );
        }
    }
    out
}

/// The file holds the proxy password and the tokens: always a new 0600 file of ours (see
/// [`crate::fsutil::replace_private_file`]), never a link followed or an old file's mode kept.
/// `NAME=value` lines that a shell can source (`set -a; . FILE`, as the README does): a value
/// with anything but `[A-Za-z0-9_@%+=:,./-]` is single-quoted (a `cert_dir` with a space or a
/// `$` broke the sourcing, and ran what followed the space; outside pass h47a). The values
/// sealgate writes otherwise (tokens, proxy URLs, plain paths) stay bare, as env-file readers
/// that take quotes literally (`docker run --env-file`) need them.
fn write_env_file(path: &std::path::Path, lines: &[(String, String)]) -> anyhow::Result<()> {
    let text: String = lines
        .iter()
        .map(|(k, v)| format!("{k}={}\n", env_file_value(v)))
        .collect();
    crate::fsutil::replace_private_file(path, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing the env file {}: {e}", path.display()))
}

/// `v` as it is when a shell reads it unchanged, else [`shell_quote`]d.
fn env_file_value(v: &str) -> std::borrow::Cow<'_, str> {
    let bare = |b: u8| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b);
    match !v.is_empty() && v.bytes().all(bare) {
        true => std::borrow::Cow::Borrowed(v),
        false => std::borrow::Cow::Owned(shell_quote(v)),
    }
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

fn print(v: &Value, as_json: bool) {
    if as_json {
        emit(serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    match v {
        Value::Array(items) if items.is_empty() => emit("(none)"),
        Value::Array(items) => items.iter().for_each(|i| emit(summary(i))),
        Value::Object(fields) => {
            // `warn` has put the warnings on stderr already; `--json` keeps them in the answer.
            let shown: serde_json::Map<_, _> = fields
                .iter()
                .filter(|(k, _)| k.as_str() != "warnings")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            emit(serde_json::to_string_pretty(&shown).unwrap_or_default());
        }
        other => emit(other),
    }
}

/// Writes one line of an answer to stdout. A reader that went away (`sealgate store list |
/// head -1`) ends the command quietly with status 141, as SIGPIPE ends a Unix filter; any other write
/// error (`>/dev/full`) is an error. `println!` panicked on both (outside pass: exit 101 and a
/// backtrace).
pub(super) fn emit(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => {}
        // 141, as a shell reports a process SIGPIPE ended: the answer was not all read, which
        // `set -o pipefail` must see (a `sandbox create` whose credentials were lost; review).
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            super::say(format_args!(
                "sealgate: error: writing the answer to stdout: {e}"
            ));
            std::process::exit(1)
        }
    }
}

fn summary(v: &Value) -> String {
    let field = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
        None => String::new(),
    };
    if v.get("ca_cert_pem").is_some() {
        return format!(
            "{}  store={}  expires={}",
            field("id"),
            field("secret_store_name"),
            field("expires_at")
        );
    }
    if v.get("locations").is_some() {
        return format!(
            "{}  allowed_hosts={}  locations={}",
            field("name"),
            field("allowed_hosts"),
            field("locations")
        );
    }
    format!(
        "{}  {}  egress_allowlist={}",
        field("id"),
        field("name"),
        field("egress_allowlist")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value comes back as written when `sh` sources the file; the usual ones are bare.
    #[test]
    fn an_env_file_sources_in_sh_with_each_value_as_written() {
        let values = [
            "osb_sealed_0123456789abcdef0123456789abcdef",
            "http://sbx_ab:pw@127.0.0.1:3128",
            "localhost,127.0.0.1,::1",
            "/srv/c certs $HOME/`id`;x",
            "it's \"quoted\" \\ and\nnewline",
            "",
        ];
        let lines: Vec<(String, String)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), (*v).to_owned()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox.env");
        write_env_file(&path, &lines).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!(
                "V0={}\nV1={}\nV2={}\n",
                values[0], values[1], values[2]
            )),
            "{text}"
        );
        for (i, v) in values.iter().enumerate() {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("set -a; . \"$1\"; printf %s \"$V{i}\""))
                .arg("sh")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), *v, "{text}");
        }
    }

    #[test]
    fn a_store_not_found_is_named_as_the_daemon_names_it() {
        assert_eq!(
            no_such_store("nosuch").to_string(),
            "store 'nosuch' not found"
        );
        let long = no_such_store("a'sk-live-51HxyzFAKEsecretValue0123456789").to_string();
        assert!(
            !long.contains("FAKE") && long.contains("not repeated"),
            "{long}"
        );
    }
}

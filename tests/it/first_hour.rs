//! The first hour of a new user: the README demo runs verbatim (twice, leaving nothing behind),
//! CLI errors read like a CLI's (exit code and text), and misconfigurations are refused with a
//! message instead of being silently accepted.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::daemon::Harness;

// ---- running the binary ---------------------------------------------------------------------

/// `sealgate ARGS` with no inherited sealgate settings.
fn sealgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sealgate"));
    for var in [
        "SEALGATE_CONFIG",
        "SEALGATE_ADMIN_URL",
        "SEALGATE_ADMIN_TOKEN",
        "SEALGATE_MASTER_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

/// A client command against `h`, with `stdin` piped in.
async fn client(h: &Harness, args: &[&str], stdin: &str) -> Output {
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(args);
    run_with_stdin(c, stdin).await
}

/// Runs `c` without blocking the runtime (the in-process daemon shares the test's thread).
async fn run_with_stdin(c: Command, stdin: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::from(c)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sealgate");
    let mut pipe = child.stdin.take().unwrap();
    // A command that does not read its stdin (`--from-env`) may have exited already: a broken
    // pipe then is no failure (it failed the test once under the whole suite's load).
    match pipe.write_all(stdin.as_bytes()).await {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    drop(pipe);
    child.wait_with_output().await.unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit `code` and that stderr is exactly `sealgate: error: {msg}`.
fn assert_error(o: &Output, code: i32, msg: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    assert_eq!(stderr(o), format!("sealgate: error: {msg}\n"));
}

// ---- CLI messages ---------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_store_has_one_wording_without_http_status() {
    let h = Harness::start().await;
    let msg = "store 'nosuch' not found";
    for args in [
        &["store", "get", "nosuch"][..],
        &["store", "delete", "nosuch"],
        &["secret", "list", "nosuch"],
        &["sandbox", "create", "--store", "nosuch"],
    ] {
        let o = client(&h, args, "").await;
        assert_error(&o, 1, msg);
    }
    let o = client(
        &h,
        &["secret", "set", "nosuch", "K", "--location", "header"],
        "v",
    )
    .await;
    assert_error(&o, 1, msg);
}

/// `sandbox create --env-file` never replaces a FIFO, device or directory (run as root with
/// `/dev/null`, it replaced the host's /dev/null with a 0600 file: outside pass), and is
/// refused before the sandbox exists; an env file that cannot be written once it does
/// deletes the sandbox again (nothing else holds its proxy password: outside re-check).
#[tokio::test]
async fn an_env_file_that_cannot_be_written_leaves_no_sandbox() {
    use std::os::unix::fs::FileTypeExt as _;
    let h = Harness::start().await;
    h.store("s", None).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("env.fifo");
    mkfifo(&fifo);
    let fifo_arg = fifo.to_str().unwrap();
    let o = client(
        &h,
        &["sandbox", "create", "--store", "s", "--env-file", fifo_arg],
        "",
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a FIFO, not a regular file"),
        "{}",
        stderr(&o)
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    let missing = dir.path().join("no-such-dir/sandbox.env");
    let missing_arg = missing.to_str().unwrap();
    let o = client(
        &h,
        &[
            "sandbox",
            "create",
            "--store",
            "s",
            "--env-file",
            missing_arg,
        ],
        "",
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("was deleted again"), "{}", stderr(&o));
    let (s, v) = h.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!([]), "no sandbox left: {v}");
}

#[tokio::test]
async fn api_errors_are_the_daemons_sentence_without_a_status_prefix() {
    let h = Harness::start().await;
    h.store("taken", None).await;
    let o = client(&h, &["store", "create", "taken"], "").await;
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("sealgate: error: ") && e.contains("taken"),
        "{e}"
    );
    assert!(!e.contains("409") && !e.contains("conflict:"), "{e}");
    let o = client(&h, &["store", "create", "x", "--allow", "a.*.com"], "").await;
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("400") && e.contains("a.*.com"), "{e}");
}

#[tokio::test]
async fn blank_store_names_are_refused_as_blank_by_the_cli_and_the_api() {
    let h = Harness::start().await;
    let msg = "store name must not be empty or only whitespace";
    for name in ["   ", "", "\t"] {
        assert_error(&client(&h, &["store", "create", name], "").await, 1, msg);
    }
    h.store("named", None).await;
    assert_error(
        &client(&h, &["store", "update", "named", "--name", "  "], "").await,
        1,
        msg,
    );
    let (s, v) = h
        .api(Method::POST, "/v1/stores", Some(json!({"name": "   "})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["message"], msg);
}

#[tokio::test]
async fn location_values_are_checked_by_the_cli_with_the_allowed_list() {
    let o = sealgate()
        .args([
            "--admin-url",
            "http://127.0.0.1:9",
            "secret",
            "set",
            "s",
            "K",
            "--location",
            "headers",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("invalid value 'headers' for '--location <LOCATIONS>'")
            && e.contains("[possible values: header, query, body]"),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_daemon_is_named_with_a_hint() {
    // A port nothing in this run listens on (nor is given by a port-0 bind).
    let port = crate::support::ports::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let o = sealgate()
        .args(["--admin-url", &url, "--admin-token", "t", "store", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!(
            "sealgate: error: cannot reach the daemon at {url} — is `sealgate serve` running?"
        )),
        "{e}"
    );
    assert!(!e.contains("client error"), "{e}");
}

/// The proxy's port given as the admin API's (both are in the start-up summary): the proxy's
/// own 407 advice is about sandboxes' proxy URLs, so the CLI says which listener it reached.
/// `secret set STORE NAME VALUE` (or `--value VALUE`), the form a newcomer tries first: refused
/// with the ways that work, and the value not printed back (clap's "unexpected argument" did).
#[tokio::test]
async fn a_value_on_the_command_line_is_refused_without_being_repeated() {
    let value = "sk-argv-never-echoed-4411";
    for extra in [
        &[value][..],
        &["--value", value],
        &[&format!("--value={value}")],
    ] {
        let mut args = vec!["--admin-url", "http://127.0.0.1:9", "--admin-token", "t"];
        args.extend(["secret", "set", "demo", "KEY"]);
        args.extend(extra);
        let o = sealgate().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let e = stderr(&o);
        assert!(!e.contains(value) && !String::from_utf8_lossy(&o.stdout).contains(value));
        assert!(
            e.contains("never taken from the command line") && e.contains("--from-env"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn the_proxy_port_given_as_the_admin_api_is_named() {
    let h = Harness::start().await;
    let url = format!("http://{}", h.proxy);
    let mut c = sealgate();
    c.args([
        "--admin-url",
        &url,
        "--admin-token",
        &h.token,
        "store",
        "list",
    ]);
    let o = run_with_stdin(c, "").await;
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{url} is sealgate's proxy listener, not its admin API"
        )),
        "{e}"
    );
}

#[tokio::test]
async fn a_missing_token_file_says_to_start_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let o = sealgate()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["store", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    let token = dir.path().join("admin.token");
    assert!(
        e.starts_with(&format!(
            "sealgate: error: cannot read the admin token {}",
            token.display()
        )) && e.contains("start `sealgate serve`"),
        "{e}"
    );
}

/// The CLI reads the token file as the daemon does: a FIFO in its place is refused at once
/// (the command hung), naming the file.
#[tokio::test]
async fn a_fifo_as_the_token_file_is_refused_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    mkfifo(&token);
    let mut cli = sealgate();
    cli.arg("--data-dir")
        .arg(dir.path())
        .args(["store", "list"]);
    let e = stderr(&run_bounded(cli, "the CLI, a FIFO as its token file"));
    assert!(
        e.contains(&token.display().to_string()) && e.contains("not a regular file"),
        "{e}"
    );
}

#[tokio::test]
async fn a_secret_that_can_never_be_unsealed_prints_the_apis_warning() {
    let h = Harness::start().await;
    h.store("w", Some(&["api.example.test"])).await;
    let o = client(
        &h,
        &[
            "secret",
            "set",
            "w",
            "K",
            "--allowed-host",
            "other.example.test",
            "--location",
            "header",
        ],
        "sk-warned-value-5150",
    )
    .await;
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert_eq!(
        e,
        "sealgate: warning: secret K can never be unsealed: none of its allowed_hosts is \
         reachable under store w's egress_allowlist\n"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("never be unsealed"),
        "said once, on stderr: {out}"
    );
    let mut args = vec!["--json", "secret", "set", "w", "K", "--allowed-host"];
    args.extend(["other.example.test", "--location", "header"]);
    let o = client(&h, &args, "sk-warned-value-5150").await;
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        answer["warnings"].as_array().map(Vec::len),
        Some(1),
        "--json keeps them"
    );
    let o = client(
        &h,
        &[
            "secret",
            "set",
            "w",
            "K2",
            "--allowed-host",
            "*.example.test",
            "--location",
            "header",
        ],
        "sk-warned-value-5150",
    )
    .await;
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stderr(&o), "", "an overlapping list is not warned about");
    h.register_secret("sk-warned-value-5150");
    h.assert_logs_clean();
}

/// An answer whose reader went away (`| head -1`) ends the CLI quietly with status 141 (as
/// SIGPIPE ends a filter: `pipefail` sees the answer was not all read), one that cannot be
/// written (`>/dev/full`) is a one-line error, and a warning to a stderr that cannot be written
/// is dropped: `println!`/`eprintln!` panicked (exit 101 and a backtrace; outside passes).
#[tokio::test]
async fn an_answer_nobody_reads_or_that_cannot_be_written_ends_cleanly() {
    let h = Harness::start().await;
    h.store("piped", None).await;
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(["--json", "store", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(c).spawn().unwrap();
    drop(child.stdout.take()); // the reader is gone before the answer comes
    let o = child.wait_with_output().await.unwrap();
    assert_eq!((o.status.code(), stderr(&o).as_str()), (Some(141), ""));

    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(["--json", "store", "list"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .stderr(Stdio::piped());
    // Not `output()`: tokio's pipes stdout over what was set.
    let child = tokio::process::Command::from(c).spawn().unwrap();
    let o = child.wait_with_output().await.unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("sealgate: error: writing the answer to stdout: No space left"),
        "{}",
        stderr(&o)
    );

    // A warning (PATCH to a null allowlist) to a stderr that cannot be written.
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(["store", "update", "piped", "--unrestricted"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create("/dev/full").unwrap());
    let o = tokio::process::Command::from(c).spawn().unwrap();
    let o = o.wait_with_output().await.unwrap();
    assert_eq!(o.status.code(), Some(0));
}

#[tokio::test]
async fn empty_secret_values_and_unset_variables_are_refused_before_any_call() {
    let h = Harness::start().await;
    h.store("e", Some(&["api.example.test"])).await;
    let set = ["secret", "set", "e", "K", "--location", "header"];
    for empty in ["", "\n", "\r\n"] {
        assert_error(
            &client(&h, &set, empty).await,
            1,
            "the secret value read from stdin is empty (is the variable you piped in set?); \
             pipe the value in, or use --from-env VAR",
        );
    }
    let var = "SEALGATE_TEST_FIRST_HOUR_UNSET";
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(set)
        .args(["--from-env", var])
        .env_remove(var);
    assert_error(
        &run_with_stdin(c, "ignored").await,
        1,
        &format!("--from-env {var}: environment variable {var} is not set"),
    );
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(set)
        .args(["--from-env", var])
        .env(var, "");
    assert_error(
        &run_with_stdin(c, "").await,
        1,
        &format!("--from-env {var}: environment variable {var} is empty"),
    );
    let (_, v) = h.api(Method::GET, "/v1/stores", None).await;
    let id = v[0]["id"].as_str().unwrap().to_owned();
    let (_, secrets) = h
        .api(Method::GET, &format!("/v1/stores/{id}/secrets"), None)
        .await;
    assert_eq!(secrets, json!([]), "nothing was stored");
    let mut c = sealgate();
    c.args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
        .args(set)
        .args(["--from-env", var])
        .env(var, "sk-from-env-7070\n");
    let o = run_with_stdin(c, "").await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    h.register_secret("sk-from-env-7070");
    h.assert_logs_clean();
}

/// On a terminal, `secret set` refuses with a hint instead of waiting silently for
/// end-of-input (util-linux `script` gives the command a pseudo-terminal).
#[tokio::test]
async fn a_terminal_on_stdin_is_refused_with_a_hint() {
    let h = Harness::start().await;
    let cmd = format!(
        "{} --admin-url {} --admin-token {} secret set s K",
        env!("CARGO_BIN_EXE_sealgate"),
        h.admin_url,
        h.token
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("the secret value is read from stdin, which is a terminal: pipe it in"),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(1), "{out}");
}

// ---- misconfiguration -----------------------------------------------------------------------

/// A config for `serve` on port 0 with everything under `dir`.
fn serve_config(dir: &Path, data_dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("proxy-{}.toml", rand_suffix()));
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\ncert_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\n{extra}",
            data_dir.display(),
            dir.join("certs").display()
        ),
    )
    .unwrap();
    path
}

/// `serve` with `cfg` and `env`, run to its end (these configurations never start).
fn serve_once(cfg: &Path, env: &[(&str, &str)]) -> Output {
    sealgate()
        .envs(env.iter().copied())
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `c` to its end (no stdin, stderr kept), failing if it takes over 20 s (`what` hangs).
fn run_bounded(mut c: Command, what: &str) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn rand_suffix() -> String {
    format!("{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[tokio::test]
async fn an_unknown_log_level_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(
        dir.path(),
        &dir.path().join("data"),
        "[log]\nlevel = \"warning\"\n",
    );
    let o = serve_once(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(
            "log.level: 'warning' is not a level (trace, debug, info, warn, error, off) or a \
             target=level directive"
        ),
        "{e}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

/// `serve` with `cfg` as uid/gid 65534 (through `setpriv` when root, so permissions bind);
/// returns its stderr, after checking it exited 1.
fn serve_as_nobody_fails(cfg: &Path) -> String {
    // SAFETY: geteuid has no preconditions.
    let mut c = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.arg(env!("CARGO_BIN_EXE_sealgate"));
        c
    } else {
        sealgate()
    };
    for var in ["SEALGATE_ADMIN_TOKEN", "SEALGATE_MASTER_KEY"] {
        c.env_remove(var);
    }
    let o = c
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    stderr(&o)
}

/// Start-up errors name the file and the operation, and never suggest the wrong fix: an
/// unreadable admin.token was "creating …: File exists" (deleting it rotates every client's
/// token), a read-only database "data directory: Permission denied".
#[tokio::test]
async fn start_errors_name_the_file_and_what_failed() {
    use std::os::unix::fs::{chown, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "").unwrap();
    let cfg = serve_config(dir.path(), &file, "");
    let e = serve_as_nobody_fails(&cfg);
    let want = format!(
        "data_dir {}: it exists and is not a directory",
        file.display()
    );
    assert!(e.contains(&want), "{e}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the permission cases need root (chown to 65534)");
        return;
    }

    let data = dir.path().join("data");
    let certs = dir.path().join("certs");
    for d in [&data, &certs] {
        std::fs::create_dir(d).unwrap();
        chown(d, Some(65534), Some(65534)).unwrap();
    }
    let token = data.join("admin.token");
    std::fs::write(&token, "a-token-of-the-operators-own-0123456789\n").unwrap();
    chown(&token, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o000)).unwrap();
    let cfg = serve_config(dir.path(), &data, "");
    let e = serve_as_nobody_fails(&cfg);
    let want = format!("reading {}: Permission denied", token.display());
    assert!(e.contains(&want), "{e}");
    assert!(!e.contains("File exists"), "{e}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let db = data.join("sealgate.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = serve_as_nobody_fails(&cfg);
    let want = format!("opening {} for writing: Permission denied", db.display());
    assert!(e.contains(&want), "{e}");
}

/// A FIFO in place of `master.key` or `admin.token` is refused at start, naming the file: its
/// read blocked for ever, silently, holding the data_dir lock (outside pass).
#[tokio::test]
async fn a_fifo_in_place_of_the_key_or_the_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = serve_config(dir.path(), &data, "");
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .unwrap();
    }
    for name in ["master.key", "admin.token"] {
        let file = data.join(name);
        mkfifo(&file);
        let mut serve = sealgate();
        serve.arg("--config").arg(&cfg).arg("serve");
        let o = run_bounded(serve, &format!("the start, a FIFO as {name}"));
        let e = stderr(&o);
        assert!(!o.status.success(), "{e}");
        assert!(
            e.contains(&file.display().to_string()) && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();
        if name == "master.key" {
            // A key of its own for the token's turn (base64 of 32 bytes, 0600).
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(&file, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// `[audit] path` naming one of the daemon's own files is refused at start (the first line
/// appended to `master.key` made the next start refuse the key: outside pass), and a path
/// that cannot be opened is named.
#[tokio::test]
async fn an_audit_path_on_the_daemons_own_files_is_refused_and_a_bad_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for own in [
        "master.key",
        "sealgate.db",
        "admin.token",
        "isolated-sandboxes",
    ] {
        let target = data.join(own);
        let extra = format!("[audit]\npath = \"{}\"\n", target.display());
        let o = serve_once(&serve_config(dir.path(), &data, &extra), &[]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{e}");
        assert!(
            e.contains("[audit] path:") && e.contains("own files"),
            "{e}"
        );
    }
    let key = std::fs::read_to_string(data.join("master.key")).unwrap();
    assert_eq!(key.lines().count(), 1, "the key file is only the key");
    // The configuration file itself.
    let own_cfg = dir.path().join("self.toml");
    let extra = format!("[audit]\npath = \"{}\"\n", own_cfg.display());
    std::fs::rename(serve_config(dir.path(), &data, &extra), &own_cfg).unwrap();
    let e = stderr(&serve_once(&own_cfg, &[]));
    assert!(
        e.contains("[audit] path:") && e.contains("own files"),
        "{e}"
    );
    let missing = dir.path().join("nodir/audit.log");
    let extra = format!("[audit]\npath = \"{}\"\n", missing.display());
    let o = serve_once(&serve_config(dir.path(), &data, &extra), &[]);
    let e = stderr(&o);
    assert!(
        e.contains(&format!("opening the audit log {}", missing.display())),
        "{e}"
    );
}

/// An empty admin.token (a crash between create and write could leave one) would have been the
/// token "", which a request without `Authorization` matched: every admin route open. The
/// daemon refuses to start on it, saying how to fix it; a blank `SEALGATE_ADMIN_TOKEN` too.
#[tokio::test]
async fn a_blank_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, " \n").unwrap();
    let cfg = serve_config(dir.path(), &data, "");
    let o = serve_once(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!(
        "{} is empty: write a long random token into it",
        token.display()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    std::fs::remove_file(&token).unwrap();
    let o = serve_once(&cfg, &[("SEALGATE_ADMIN_TOKEN", "   ")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("SEALGATE_ADMIN_TOKEN is blank"),
        "{}",
        stderr(&o)
    );
    assert!(!token.exists(), "nothing was generated in its place");
    // A link to a missing file is refused, not replaced.
    std::os::unix::fs::symlink(dir.path().join("gone"), &token).unwrap();
    let o = serve_once(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a link to a missing file"),
        "{}",
        stderr(&o)
    );
    assert!(token.is_symlink(), "the operator's link is kept");
}

/// An admin token file group or others may read is refused at start, as a master key file is
/// (the token can open any store's allowlist; found from outside: a 0644 token was used).
#[tokio::test]
async fn an_admin_token_readable_by_others_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, "an-operator-written-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = serve_config(dir.path(), &data, "");
    let o = serve_once(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!(
        "{} has mode 644; it must not be accessible",
        token.display()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("an-operator-written-token"),
        "never the token"
    );
}

/// A damaged record of the deletions pending since a database outage stops the start and
/// names the file: a node that cannot tell which sandboxes were deleted must serve none.
#[tokio::test]
async fn a_damaged_record_of_pending_deletions_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let record = data.join("pending-deletions");
    std::fs::write(&record, "sbx_0123456789abcdef01234567\n../../etc/passwd\n").unwrap();
    let cfg = serve_config(dir.path(), &data, "");
    let o = serve_once(&cfg, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!("{} line 2 is not a sandbox id", record.display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
}

/// Kills a spawned daemon when the test ends, however it ends.
struct Spawned(std::process::Child);

/// `serve` with a fresh config for `data` under `dir`, its stderr in `log`.
fn serve_command(dir: &Path, data: &Path, log: &Path) -> Command {
    let mut c = sealgate();
    c.arg("--config")
        .arg(serve_config(dir, data, ""))
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_for_text(path: &Path, text: &str, child: &mut std::process::Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got.contains(text) {
            return got;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("daemon exited ({status}) before saying {text:?}:\n{got}");
        }
        assert!(Instant::now() < deadline, "no {text:?} within 60 s:\n{got}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon that is not root sweeps no namespace: it cannot read the root-only records, and
/// took a live root daemon's sandboxes for leftovers (outside pass). The "namespace" here is
/// an old file in /run/netns named like the pool's last slot, which sealgate never allocates.
#[tokio::test]
async fn a_daemon_not_run_as_root_sweeps_no_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the daemon under test is then not root either: nothing to show
    }
    let fake = Path::new("/run/netns/sealgate-7fbf");
    std::fs::create_dir_all("/run/netns").unwrap();
    std::fs::write(fake, "").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(fake)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, log) = serve_as_nobody(dir.path(), "[log]\nlevel = \"debug\"\n");
    let banner = wait_for_text(&log, "  master key:", &mut daemon.0);
    let _ = std::fs::remove_file(fake);
    assert!(!banner.contains("leftover"), "{banner}");
}

/// A daemon that is not root says so in its start summary, and refuses an isolated sandbox
/// at once, saying it needs root and naming the proxy-only way; it had failed part-way,
/// naming a record file under /run it could not write (outside pass h45a).
#[tokio::test]
async fn a_daemon_not_run_as_root_refuses_isolation_saying_why() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // setpriv needs root to run the daemon as another user
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, log) = serve_as_nobody(dir.path(), "");
    let banner = wait_for_text(&log, "  isolation:", &mut daemon.0);
    assert!(
        banner.contains(
            "  isolation:   \"netns\" refused: the daemon lacks root (it runs as uid 65534)\n"
        ),
        "{banner}"
    );
    let url = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin API:"))
        .unwrap()
        .trim()
        .to_owned();
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let post = |path: &str, body: serde_json::Value| {
        let o = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
            ])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .arg("--data")
            .arg(body.to_string())
            .arg(format!("{url}{path}"))
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let made = post("/v1/stores", json!({"name": "s", "egress_allowlist": []}));
    assert!(made.ends_with("201"), "{made}");
    let refused = post(
        "/v1/sandboxes",
        json!({"secret_store": "s", "isolation": "netns"}),
    );
    assert!(refused.ends_with("500"), "{refused}");
    assert!(
        refused.contains("\"code\":\"isolation_failed\"")
            && refused.contains("isolated sandboxes need the daemon to run as root with CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SETUID and CAP_SETGID, and this one lacks root (it runs as uid 65534)")
            && refused.contains("\\\"isolation\\\": \\\"none\\\" (proxy-only)"),
        "{refused}"
    );
    let proxy_only = post("/v1/sandboxes", json!({"secret_store": "s"}));
    assert!(proxy_only.ends_with("201"), "{proxy_only}");
}

/// `sealgate serve` run as nobody (uid 65534, through `setpriv`) with its config, data and
/// log (`serve.log`, returned) in `dir`, made writable for it; `extra` goes into the config.
fn serve_as_nobody(dir: &Path, extra: &str) -> (Spawned, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = dir.join("serve.log");
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_sealgate"))
        .arg("--config")
        .arg(serve_config(dir, &dir.join("data"), extra))
        .arg("serve")
        .env_remove("SEALGATE_ADMIN_TOKEN")
        .env_remove("SEALGATE_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    (Spawned(c.spawn().unwrap()), log)
}

/// The daemon's memory (master key, values, admin token) is kept out of core dumps and out
/// of reach of other processes of its user: soft core limit 0 and not dumpable, so another
/// process of the same user cannot read its `/proc/PID/environ` (nor `mem`) — it could before.
#[tokio::test]
async fn the_daemon_leaves_no_core_and_its_memory_is_closed_to_its_own_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // setpriv needs root to run the daemon as another user
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, log) = serve_as_nobody(dir.path(), "");
    wait_for_text(&log, "  master key:", &mut daemon.0);
    let pid = daemon.0.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().nth(4),
        Some("0"),
        "soft core limit: {core}"
    );
    let peek = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(format!("/proc/{pid}/environ"))
        .output()
        .unwrap();
    assert!(
        !peek.status.success(),
        "a process of the daemon's user read its environ"
    );
    assert!(
        String::from_utf8_lossy(&peek.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&peek.stderr)
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("first.log");
    let mut first = Spawned(serve_command(dir.path(), &data, &log).spawn().unwrap());
    let banner = wait_for_text(&log, "  master key:", &mut first.0);
    let certs = std::fs::canonicalize(dir.path().join("certs")).unwrap();
    assert!(
        banner.contains(&format!("  CA certs:    {}", certs.display())),
        "{banner}"
    );
    let o = sealgate()
        .arg("--config")
        .arg(serve_config(dir.path(), &data, ""))
        .arg("serve")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "sealgate: error: data_dir {} is in use by another sealgate process (pid {}); stop \
             it, or give this daemon another data_dir\n",
            data.display(),
            first.0.id()
        )
    );
    drop(first);
    // Once the first is gone the data dir is free again.
    let log2 = dir.path().join("second.log");
    let mut second = Spawned(serve_command(dir.path(), &data, &log2).spawn().unwrap());
    wait_for_text(&log2, "  master key:", &mut second.0);
}

/// The start-up summary names the master key file by its absolute path, as it does the
/// database and the token file, also for a relative `data_dir` (it printed `data/master.key`).
#[tokio::test]
async fn the_summary_names_the_key_file_absolutely() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("first.log");
    let mut c = serve_command(dir.path(), Path::new("data"), &log);
    let mut daemon = Spawned(c.current_dir(dir.path()).spawn().unwrap());
    let banner = wait_for_text(&log, "  master key:", &mut daemon.0);
    let key = std::fs::canonicalize(dir.path().join("data/master.key")).unwrap();
    let want = format!("  master key:  created new key file {}\n", key.display());
    assert!(banner.contains(&want), "{want:?} in {banner}");
}

/// A database that comes up empty beside an existing master key is said so: an outside pass
/// restored `sealgate.db` without its `-wal` after a crash and the daemon started, silently, on
/// an empty database.
#[tokio::test]
async fn an_empty_database_beside_an_existing_key_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = |log: &Path| Spawned(serve_command(dir.path(), &data, log).spawn().unwrap());
    let first_log = dir.path().join("first.log");
    let mut first = start(&first_log);
    let banner = wait_for_text(&first_log, "  master key:", &mut first.0);
    assert!(!banner.contains("was empty"), "{banner}");
    drop(first);
    for f in ["sealgate.db", "sealgate.db-wal", "sealgate.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    let second_log = dir.path().join("second.log");
    let mut second = start(&second_log);
    let banner = wait_for_text(&second_log, "  master key:", &mut second.0);
    assert!(
        banner
            .contains("the database was empty and is now initialised under an existing master key"),
        "{banner}"
    );
}

/// The sandbox CA certificates are public whatever the daemon's umask: under the shipped
/// unit's `UMask=0077` `cert_dir` came out 0700 and each PEM 0600, and a sandbox running as
/// another user could not read its CA (`curl: (77)`; outside pass).
#[tokio::test]
async fn sandbox_ca_files_are_readable_by_every_user_under_a_strict_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("serve.log");
    let mut c = serve_command(dir.path(), &data, &log);
    // SAFETY: umask is async-signal-safe and touches only the child's own state.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let mut daemon = Spawned(c.spawn().unwrap());
    let banner = wait_for_text(&log, "  master key:", &mut daemon.0);
    let admin = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin API:"))
        .expect("admin API line")
        .trim()
        .to_owned();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin_cli = |args: &[&str]| {
        let o = sealgate()
            .args(["--admin-url", &admin, "--admin-token", token.trim()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    admin_cli(&["store", "create", "s"]);
    admin_cli(&["sandbox", "create", "--store", "s"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let certs = dir.path().join("certs");
    assert_eq!(mode(&certs), 0o755);
    let pems: Vec<PathBuf> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pems.len(), 1, "{pems:?}");
    assert_eq!(mode(&pems[0]), 0o644);
    // The private side stays private.
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("admin.token")), 0o600);
    // A CA file an older build left 0600 is rewritten 0644 when the sandbox is restored.
    std::fs::set_permissions(&pems[0], std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(daemon);
    let log2 = dir.path().join("serve2.log");
    let mut daemon = Spawned(serve_command(dir.path(), &data, &log2).spawn().unwrap());
    wait_for_text(&log2, "  master key:", &mut daemon.0);
    assert_eq!(mode(&pems[0]), 0o644);
}

// ---- the README demo ------------------------------------------------------------------------

const DEMO_PORTS: [u16; 3] = [7070, 3128, 8443];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced block between the README's demo markers.
fn readme_demo_block() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let begin = readme
        .find("<!-- demo:begin")
        .expect("README has a demo:begin marker");
    let rest = &readme[begin..];
    let open = rest
        .find("```bash\n")
        .expect("a ```bash fence after demo:begin")
        + 8;
    let close = rest[open..].find("\n```\n").expect("a closing fence") + open + 1;
    rest[open..close].to_owned()
}

/// Stands in for `cargo` inside the demo: the test has built both programs already (a release
/// build here would take minutes). It accepts exactly the demo's four cargo command lines, so
/// the README block runs unchanged.
const CARGO_SHIM: &str = r#"#!/bin/sh
case "$*" in
    "build --release --quiet --bin sealgate" | "build --release --quiet --example origin") exit 0 ;;
esac
if [ "$1 $2 $3 $4 $5 $6" = "run --release --quiet --bin sealgate --" ]; then
    shift 6; exec "$SEALGATE_DEMO_BIN" "$@"
fi
if [ "$1 $2 $3 $4 $5 $6" = "run --release --quiet --example origin --" ]; then
    shift 6; exec "$SEALGATE_DEMO_ORIGIN" "$@"
fi
echo "demo test: unexpected cargo command line: cargo $*" >&2
exit 97
"#;

/// The `origin` example, built next to the test's sealgate binary (a no-op when fresh).
fn origin_example() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_sealgate"));
    let dir = bin.parent().unwrap();
    let mut c = Command::new(env!("CARGO"));
    c.args(["build", "--quiet", "--example", "origin"])
        .current_dir(repo());
    // The variables cargo sets for this test process would look like a changed environment to
    // build scripts that watch them (ring's does), rebuilding half the tree each time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || matches!(
                &*k,
                "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            );
        if set_for_tests {
            c.env_remove(&*k);
        }
    }
    if dir.ends_with("release") {
        c.arg("--release");
    }
    let o = c.output().expect("cargo build --example origin");
    assert!(o.status.success(), "{}", stderr(&o));
    dir.join("examples").join("origin")
}

fn assert_ports_free() {
    for port in DEMO_PORTS {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            let why = format!(
                "the README demo needs 127.0.0.1:{port}, which is busy ({e}): stop the \
                 `sealgate serve` or demo that holds it and run this test again"
            );
            demo_failed(&why, "(not started)");
        }
    }
}

/// Runs `script` with bash in its own process group; kills the group after `limit`.
fn run_demo(script: &Path, cwd: &Path, env: &[(&str, &Path)], limit: Duration) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let out = cwd.join("..").join(format!("demo-{}.out", rand_suffix()));
    let file = std::fs::File::create(&out).unwrap();
    let mut c = Command::new("bash");
    c.arg(script)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0);
    for var in [
        "SEALGATE_CONFIG",
        "SEALGATE_ADMIN_URL",
        "SEALGATE_ADMIN_TOKEN",
        "SEALGATE_MASTER_KEY",
    ] {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("bash runs");
    let pgid = child.id() as i32;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            demo_failed(&format!("the demo did not finish within {limit:?}"), &text);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if let Err(left) = group_is_gone(pgid) {
        demo_failed(
            &format!("the demo left processes in its group:\n{left}"),
            &text,
        );
    }
    (status.code().unwrap_or(-1), text)
}

/// Ok when no process is left in process group `pgid` within 2 s; else kills the leftovers
/// and names them (`ps` lines).
fn group_is_gone(pgid: i32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(-pgid, 0) } != 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            let ps = Command::new("ps")
                .args(["-eo", "pgid=,pid=,stat=,etime=,args="])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ps: String = ps
                .lines()
                .filter(|l| l.split_whitespace().next() == Some(&pgid.to_string()))
                .map(|l| format!("{l}\n"))
                .collect();
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return Err(ps);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The README's demo block, run as written from an empty directory, twice in a row: it exits 0
/// both times, shows that the origin received the real value while the sandbox saw only the
/// token, and leaves no process, file or port behind.
#[test]
fn readme_demo_runs_verbatim_twice_and_leaves_nothing_behind() {
    let block = readme_demo_block();
    let script = std::fs::read_to_string(repo().join("scripts/demo")).unwrap();
    assert_eq!(
        block, script,
        "README's demo block differs from scripts/demo"
    );
    let root = tempfile::tempdir().unwrap();
    let (work, tmp, shim) = (
        root.path().join("work"),
        root.path().join("tmp"),
        root.path().join("shim"),
    );
    for d in [&work, &tmp, &shim] {
        std::fs::create_dir(d).unwrap();
    }
    let demo = root.path().join("demo.sh");
    std::fs::write(&demo, &block).unwrap();
    write_executable(&shim.join("cargo"), CARGO_SHIM);
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap());
    let origin = origin_example();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sealgate"));
    let env = [
        ("PATH", Path::new(&path)),
        ("TMPDIR", tmp.as_path()),
        ("SEALGATE_DEMO_BIN", bin.as_path()),
        ("SEALGATE_DEMO_ORIGIN", origin.as_path()),
    ];
    for run in 1..=2 {
        assert_ports_free();
        let (code, out) = run_demo(&demo, &work, &env, Duration::from_secs(120));
        if code != 0 {
            demo_failed(&format!("run {run} exited {code}"), &out);
        }
        for evidence in [
            "sandbox: API_KEY=osb_sealed_",
            "\"received_expected_auth\":true",
            "\"authorization\":\"Bearer osb_sealed_",
            "\"unsealed\":[\"API_KEY\"]",
        ] {
            if !out.contains(evidence) {
                demo_failed(&format!("run {run}: no {evidence}"), &out);
            }
        }
        if out.contains("sk-real-demo") {
            demo_failed(
                &format!("run {run}: the real value reached the sandbox"),
                &out,
            );
        }
        for (dir, what) in [
            (&work, "wrote into its working dir"),
            (&tmp, "left temp files"),
        ] {
            let left = dir_entries(dir);
            if !left.is_empty() {
                demo_failed(&format!("run {run} {what}: {left:?}"), &out);
            }
        }
        assert_ports_free();
    }
}

/// Fails the demo test with the demo's output, also written straight to the process's stderr:
/// the harness captures only the panic message, and a CI log that keeps a part of the output
/// keeps the lines printed beside the test's name, not the failure summary at the end.
fn demo_failed(why: &str, out: &str) -> ! {
    use std::io::Write as _;
    let text =
        format!("\n---- README demo: {why}; its output:\n{out}\n---- end of the demo's output\n");
    let _ = std::io::stderr().write_all(text.as_bytes());
    panic!("{why}:\n{out}");
}

fn dir_entries(d: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect()
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---- scripts/test ---------------------------------------------------------------------------

/// `scripts/test` as a non-root user exits at once, saying why (as root, the test runs a copy of
/// it as `nobody` through `setpriv`; the copy lives in a world-readable temp dir, since the
/// checkout may not be).
#[test]
fn scripts_test_refuses_to_run_without_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    let text = std::fs::read_to_string(repo().join("scripts/test")).unwrap();
    write_executable(&scripts.join("test"), &text);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut c = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.arg(scripts.join("test"));
        c
    } else {
        Command::new(scripts.join("test"))
    };
    let o = c
        .current_dir(dir.path())
        .output()
        .expect("run scripts/test");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("scripts/test: must run as root"),
        "{}",
        stderr(&o)
    );
    assert!(o.stdout.is_empty(), "it did nothing else");
}

//! Command line: `serve` runs the daemon; `store`, `secret` and `sandbox` talk to a running
//! daemon's admin API. Secret values are read from stdin or a named environment variable,
//! never from argv (argv is visible to every local user through /proc).

pub mod client;
mod commands;
pub mod exec;

pub use commands::run_client;

/// Writes one line to stderr, ignoring a failure: `eprintln!` panicked (exit 101) when stderr
/// could not be written (`2>/dev/full`; outside re-check).
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(line).and_then(|()| err.write_all(b"\n"));
}

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// sealgate: egress substitution proxy for sandboxes.
#[derive(Debug, Parser)]
#[command(name = "sealgate", version = env!("SEALGATE_VERSION"), about)]
pub struct Cli {
    /// proxy.toml to load (default: embedded defaults).
    #[arg(long, global = true, env = "SEALGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir` from the config.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Admin API URL for client commands (default: `[admin] listen` of --config, i.e.
    /// http://127.0.0.1:7070).
    #[arg(long, global = true, env = "SEALGATE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Admin bearer token for client commands (default: read admin.token in the data dir of
    /// --config / --data-dir).
    #[arg(
        long,
        global = true,
        env = "SEALGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (admin API + proxy listeners).
    Serve,
    /// Manage secret stores.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Manage secrets in a store.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Manage sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Re-seal every secret and CA key under a new master key (daemon must be stopped).
    RotateMasterKey {
        /// File holding the new key (base64 of 32 bytes); created 0600 with a fresh key if missing.
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCmd),
}

/// `sealgate store …`.
#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Create a store.
    Create {
        /// Unique store name.
        name: String,
        /// Egress allowlist pattern (repeatable). Without any, the store may reach any public host
        /// on the default ports (443, and 80 for plain HTTP).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Allow no egress at all (`egress_allowlist = []`).
        #[arg(long, conflicts_with = "allow")]
        deny_all: bool,
    },
    /// List stores.
    List,
    /// Show one store (id or name).
    Get {
        /// Store id or name.
        store: String,
    },
    /// Change a store's name and/or allowlist.
    Update {
        /// Store id or name.
        store: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Replace the allowlist with these patterns (repeatable).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Remove the allowlist (any public host on the default ports: 443, and 80 for plain HTTP).
        #[arg(long, conflicts_with = "allow")]
        unrestricted: bool,
        /// Set an empty allowlist (no egress).
        #[arg(long, conflicts_with_all = ["allow", "unrestricted"])]
        deny_all: bool,
    },
    /// Delete a store and its secrets (running sandboxes keep their snapshot).
    Delete {
        /// Store id or name.
        store: String,
    },
}

/// `sealgate secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Create or replace a secret; the value comes from stdin or --from-env. A replace sets
    /// the whole secret: give --allowed-host and --location again with a new value to keep
    /// them (left out, the secret may go to every host of the store's allowlist, in headers
    /// and bodies; the answer warns when a replace widens a secret).
    Set {
        /// Store id or name.
        store: String,
        /// Secret (environment variable) name.
        name: String,
        /// Read the value from this environment variable instead of stdin.
        #[arg(long)]
        from_env: Option<String>,
        /// Host pattern the secret may be unsealed for (repeatable).
        #[arg(long = "allowed-host")]
        allowed_hosts: Vec<String>,
        /// Where the token is unsealed (repeatable; default header and body; `header` is
        /// recommended for API keys).
        #[arg(long = "location", value_enum)]
        locations: Vec<LocationArg>,
        /// A value given on the command line: refused without being repeated (clap's own
        /// "unexpected argument" error printed it back, and suggested a form that failed too).
        #[arg(hide = true)]
        stray: Vec<String>,
        /// The same, as `--value`.
        #[arg(long = "value", hide = true, allow_hyphen_values = true)]
        value_arg: Option<String>,
    },
    /// List secret metadata (never values).
    List {
        /// Store id or name.
        store: String,
    },
    /// Delete a secret.
    Delete {
        /// Store id or name.
        store: String,
        /// Secret name.
        name: String,
    },
}

/// `--location`: where a secret's token is unsealed (DESIGN.md §3 `locations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LocationArg {
    /// Every request header value.
    Header,
    /// The request URI's query string.
    Query,
    /// Request bodies (streamed).
    Body,
}

impl LocationArg {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LocationArg::Header => "header",
            LocationArg::Query => "query",
            LocationArg::Body => "body",
        }
    }
}

/// `sealgate sandbox …`.
#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox from a store.
    Create(CreateArgs),
    /// List live sandboxes.
    List,
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// End a sandbox now.
    Delete {
        /// Sandbox id.
        id: String,
    },
    /// Run a command in a network namespace whose only egress is sealgate (Linux, root).
    Exec(exec::ExecArgs),
    /// Run a command in an existing isolated sandbox (`create --isolation netns`).
    Run(exec::RunArgs),
    /// Print the iptables rules that confine a sandbox in transparent mode.
    Rules(exec::RulesArgs),
}

/// `sealgate sandbox create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Store name or id.
    #[arg(long)]
    pub store: String,
    /// Lifetime in seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Source IP (transparent mode identity).
    #[arg(long)]
    pub source_ip: Option<IpAddr>,
    /// `netns`: the daemon runs the sandbox's commands in a network namespace of its own
    /// (Linux, daemon as root); `none` (the default): a proxy-only sandbox.
    #[arg(long, value_enum)]
    pub isolation: Option<IsolationArg>,
    /// An environment variable for the sandbox's commands, `K=V`; repeatable. Plain values
    /// only: argv is visible to every local user (secrets go in the store).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub envs: Vec<(String, String)>,
    /// Print `export K=V` lines for a shell.
    #[arg(long)]
    pub export: bool,
    /// Write `K=V` lines to this env file (0600) and print only the sandbox id.
    #[arg(long)]
    pub env_file: Option<PathBuf>,
}

/// `--isolation` (the API's `isolation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// Proxy only: the sandbox's code runs elsewhere and uses `proxy_env`.
    None,
    /// A network namespace of the daemon's, whose only way out is sealgate.
    Netns,
}

impl IsolationArg {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationArg::None => "none",
            IsolationArg::Netns => "netns",
        }
    }
}

/// `K=V` → `(K, V)`; the name is checked by the daemon (an env-var name).
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

/// `sealgate audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print the audit log and follow it.
    Tail {
        /// Audit file (default: `[audit] path` of the config).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
}

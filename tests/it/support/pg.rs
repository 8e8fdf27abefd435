//! A throwaway PostgreSQL cluster owned by the test process: its own data directory in a temp
//! dir, listening only on a unix socket in that dir (`listen_addresses = ''`), stopped when the
//! owner drops it or — for the shared cluster — when the test process exits (parent-death
//! signal). Shared by the unit tests (`#[path]`-included from `src/store/postgres/tests.rs`) and
//! the integration tests.
//!
//! Binaries: `$SEALGATE_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `pg_config
//! --bindir`. Missing binaries are a test FAILURE (`scripts/test` installs `postgresql`), never
//! a skip. As root, the server runs as the `postgres` user (initdb refuses root).

#![allow(dead_code)]

#[path = "ports.rs"]
pub mod ports;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The socket "port" (it only names the socket file, which lives in a private directory).
const PORT: u16 = 5432;

/// A running (or stopped) test cluster.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    /// Remove `dir` on drop (owned clusters).
    cleanup: bool,
    /// The port: [`PORT`] (naming only the socket file), or a free TCP port for a cluster that
    /// also listens on 127.0.0.1 ([`Cluster::owned_tls`]).
    port: u16,
    /// Extra server settings (`-c` arguments).
    settings: Vec<String>,
}

/// The cluster shared by every test of this process; each test makes its own database in it.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        remove_stale_dirs();
        // Spawned from a thread that lives as long as the process, so the parent-death signal
        // fires only when the process exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cluster = Cluster::init();
            cluster.cleanup = false;
            cluster.start();
            tx.send(cluster).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("starting the shared PostgreSQL cluster")
    })
}

impl Cluster {
    /// A new cluster that this value owns (stopped and removed on drop), already started.
    pub fn owned() -> Cluster {
        let cluster = Cluster::init();
        cluster.start();
        cluster
    }

    /// Like [`Cluster::owned`], also listening on 127.0.0.1 (a free port, [`Cluster::tcp_url`])
    /// with TLS on: `cert_pem` and `key_pem` are the server's certificate and key. TLS is
    /// offered, not required: `initdb --auth=trust` lets plain TCP in too.
    pub fn owned_tls(cert_pem: &str, key_pem: &str) -> Cluster {
        let mut cluster = Cluster::init();
        let data = cluster.dir.join("data");
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some((uid, gid)) = cluster.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        cluster.settings = ["listen_addresses=127.0.0.1", "ssl=on"]
            .map(String::from)
            .to_vec();
        // A port from `support::ports` (below the ephemeral range); should it still be taken
        // before postgres binds it, the server exits: try another.
        let mut last = String::new();
        for _ in 0..3 {
            cluster.port = ports::free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(log) => last = log,
            }
        }
        panic!("PostgreSQL with TLS did not start: {last}");
    }

    /// A TCP connection string for database `db` of an [`Cluster::owned_tls`] cluster, naming
    /// the host `localhost` (the name its certificate must carry) at 127.0.0.1; `extra` is
    /// appended (e.g. `sslmode=require`).
    pub fn tcp_url(&self, db: &str, extra: &str) -> String {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname={db} {extra}",
            self.port
        )
    }

    fn init() -> Cluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("sealgate-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL")
            .keep();
        let owner = postgres_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown pg dir");
        }
        let status = as_owner(Command::new(bin.join("initdb")), owner)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("running {}/initdb: {e}", bin.display()));
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        Cluster {
            dir,
            bin,
            owner,
            child: Mutex::new(None),
            cleanup: true,
            port: PORT,
            settings: Vec::new(),
        }
    }

    /// Starts the server (no-op if running) and waits until it accepts connections.
    pub fn start(&self) {
        if let Err(log) = self.try_start() {
            panic!("PostgreSQL did not start: {log}");
        }
    }

    /// [`Cluster::start`], returning the server's log if it does not come up.
    fn try_start(&self) -> Result<(), String> {
        let mut child = self.child.lock().unwrap();
        if child.is_some() {
            return Ok(());
        }
        let mut cmd = as_owner(Command::new(self.bin.join("postgres")), self.owner);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"]);
        for setting in &self.settings {
            cmd.args(["-c", setting]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::from(
            std::fs::File::create(self.dir.join("server.log")).unwrap(),
        ));
        // SAFETY: prctl only sets a flag of the child process; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        *child = Some(cmd.spawn().expect("spawning postgres"));
        drop(child);
        self.try_wait_ready()
    }

    /// Stops the server at once (immediate shutdown, as a crash or a cut cable would).
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            let _ = c.wait();
        }
    }

    /// Waits until the server accepts connections (30 s at most); a server that exits
    /// meanwhile (e.g. its TCP port was taken) is an error at once. The error is its log.
    fn try_wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = || std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        loop {
            if self.try_psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            let exited = match self.child.lock().unwrap().as_mut() {
                Some(c) => c.try_wait().ok().flatten().is_some(),
                None => true,
            };
            if exited || Instant::now() > deadline {
                self.child.lock().unwrap().take();
                return Err(log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection string for database `db` (key=value form, unix socket).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        )
    }

    /// Creates a fresh, uniquely named database; returns its name.
    pub fn create_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            random_suffix()
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs `sql` in `db` with psql; returns the unaligned, tuples-only output.
    ///
    /// # Panics
    /// If psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    /// Starts psql running `sql` in `db` without waiting for it (e.g. a transaction that holds a
    /// lock for a while).
    pub fn psql_spawn(&self, db: &str, sql: &str) -> Child {
        self.psql_cmd(db, sql)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn psql")
    }

    fn psql_cmd(&self, db: &str, sql: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ]);
        cmd
    }

    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self.psql_cmd(db, sql).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if self.cleanup {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes data directories of shared clusters from earlier test processes: stopped (no
/// `postmaster.pid`) and older than ten minutes.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let named = e.file_name().to_string_lossy().starts_with("sealgate-pg-");
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if named && old && !path.join("data/postmaster.pid").exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:x}")
}

/// As root, the `postgres` user's uid and gid (initdb and postgres refuse to run as root).
fn postgres_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: getpwnam with a NUL-terminated name; the result is read before any other call.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root, but there is no 'postgres' user to run the test cluster as \
         (apt-get install postgresql creates it)"
    );
    // SAFETY: non-null pointer from getpwnam.
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

fn as_owner(mut cmd: Command, owner: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd.current_dir("/");
    cmd
}

/// Where the PostgreSQL server binaries are (see the module docs).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SEALGATE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").is_file());
    versions.sort();
    if let Some(dir) = versions.pop() {
        return dir;
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match from_pg_config {
        Some(dir) if Path::new(&dir).join("initdb").is_file() => dir,
        _ => panic!(
            "PostgreSQL server binaries (initdb, postgres) not found: install the `postgresql` \
             package (scripts/test does) or set SEALGATE_PG_BIN"
        ),
    }
}

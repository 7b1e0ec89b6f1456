//! A PgBouncer in transaction pooling mode in front of the test database, started by the
//! test that needs it on a free local port and stopped when the returned guard drops.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fascicle_conformance::Fixture;
use fascicle_postgres::{PostgresOptions, PostgresStore};

/// A running PgBouncer; killed on drop.
pub struct Pooler {
    /// `postgres://` URL of the test database through the pooler.
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn require_pgbouncer() -> bool {
    std::env::var("REQUIRE_PGBOUNCER").is_ok_and(|v| v == "1")
}

fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PGBOUNCER") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

/// How the pooler is configured beyond `pool_mode = transaction`.
#[derive(Clone, Copy)]
pub struct Config {
    /// Server connections per database and user.
    pub pool_size: u32,
    /// `ignore_startup_parameters = extra_float_digits`, which a client sending sqlx's
    /// default parameters needs to connect at all. Off, the pooler refuses a client that
    /// sends it.
    pub lenient: bool,
}

/// Starts PgBouncer (`pool_mode = transaction`, `server_round_robin = 1` so consecutive
/// transactions go to different server connections) in front of `database_url`, or the
/// reason it cannot (a failure when `REQUIRE_PGBOUNCER=1`).
pub fn start(database_url: &str, config: Config) -> Result<Pooler, String> {
    let Config { pool_size, lenient } = config;
    let ignore = if lenient { "extra_float_digits" } else { "" };
    let Some(binary) = binary() else {
        let reason = "no pgbouncer binary on PATH or in /usr/sbin (Debian package pgbouncer; \
                      or set PGBOUNCER=path); pooler tests skipped"
            .to_string();
        if require_pgbouncer() {
            panic!("REQUIRE_PGBOUNCER=1 but {reason}");
        }
        return Err(reason);
    };
    let url = url::Url::parse(database_url).map_err(|e| format!("DATABASE_URL: {e}"))?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(5432);
    let user = if url.username().is_empty() {
        "postgres".to_string()
    } else {
        url.username().to_string()
    };
    let database = url.path().trim_start_matches('/').to_string();
    let password = url
        .password()
        .map(|p| format!(" password={p}"))
        .unwrap_or_default();
    let listen = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let listen_port = listen.local_addr().map_err(|e| e.to_string())?.port();
    drop(listen);

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path();
    std::fs::write(path.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    std::fs::write(
        path.join("pgbouncer.ini"),
        format!(
            "[databases]\n\
             * = host={host} port={port}{password}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen_port}\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             max_client_conn = 2000\n\
             default_pool_size = {pool_size}\n\
             server_round_robin = 1\n\
             ignore_startup_parameters = {ignore}\n\
             unix_socket_dir =\n\
             logfile = {log}\n",
            users = path.join("users.txt").display(),
            log = path.join("pgbouncer.log").display(),
        ),
    )
    .unwrap();
    let mut command = Command::new(&binary);
    // PgBouncer refuses to run as root: it then drops to `nobody`, who must read the
    // configuration and write the log.
    if is_root() {
        let _ = Command::new("chown")
            .args(["-R", "nobody"])
            .arg(path)
            .status();
        command.args(["-u", "nobody"]);
    }
    let child = command
        .arg(path.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let mut pooler = Pooler {
        url: format!("postgres://{user}@127.0.0.1:{listen_port}/{database}"),
        child,
        _dir: dir,
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
        if let Ok(Some(status)) = pooler.child.try_wait() {
            let log = std::fs::read_to_string(pooler._dir.path().join("pgbouncer.log"))
                .unwrap_or_default();
            return Err(format!("pgbouncer exited at start ({status}): {log}"));
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err("pgbouncer did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pooler)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Options for a store of `schema` through `pooler`, as a user behind PgBouncer writes
/// them: transaction-pooler mode, and a direct URL for `LISTEN`.
pub fn options(pooler: &Pooler, direct_url: &str, schema: &str) -> PostgresOptions {
    PostgresOptions::new(&pooler.url)
        .schema(schema.to_string())
        .max_connections(6)
        .transaction_pooler(true)
        .listen_url(direct_url)
}

/// The conformance factory behind the pooler: a fresh schema per case, reached through a
/// PgBouncer of its own (transaction mode); the case's tampering and the clean-up use a
/// direct connection.
pub async fn fixture() -> Fixture {
    let database = match super::database().await {
        Ok(database) => database,
        Err(reason) => return Fixture::skipped(reason),
    };
    // Few server connections, handed out in turn: a statement sent outside a
    // transaction would soon meet a server connection it was not parsed on.
    let config = Config {
        pool_size: 4,
        lenient: false,
    };
    let pooler = match start(&database.url, config) {
        Ok(pooler) => pooler,
        Err(reason) => return Fixture::skipped(reason),
    };
    let schema = super::fresh_schema();
    let store = PostgresStore::connect_with(options(&pooler, &database.url, &schema))
        .await
        .unwrap_or_else(|e| panic!("cannot connect through the pooler: {e}"));
    let direct = super::direct_store(&database.url, &schema).await;
    let twin_options = options(&pooler, &database.url, &schema);
    let tamper = direct.clone();
    let pooled = store.clone();
    Fixture::new(store)
        .with_twin(move || super::open_twin(twin_options.clone()))
        .with_tamper(move |parent, total| super::tamper_total(tamper.clone(), parent, total))
        .with_cleanup(async move {
            pooled.pool().close().await;
            super::drop_schema(&direct).await;
            drop(pooler);
            drop(database);
        })
}

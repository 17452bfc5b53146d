//! Where the primary is, and the command connection to it with the identity it vouches for.
//!
//! Every publish passes the primary's replication ID to the publish script, which compares it with the
//! one recorded next to the channel's position (the rollback fence, `scripts.rs`). That is only sound if
//! the ID really is that of the server that runs the script, so the ID is read on the connection itself,
//! right after it is made and before any command goes through it. A restart or a failover breaks the
//! TCP connection (a new one is read anew); a primary that is turned into a replica and back while the
//! connection stays open is caught by the check every probe interval ([`Commands::verify`]).
//!
//! Redis gives a primary a fresh replication ID whenever it starts and whenever a replica is promoted
//! (<https://redis.io/docs/latest/operate/oss_and_stack/management/replication/>, "Replication ID
//! explained"), so the ID names one unbroken history of writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use herald_core::EngineError;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;

/// Locks `mutex`, also after a panic elsewhere poisoned it (every value kept under one stays valid).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unavailable(error: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(error.to_string())
}

/// Whether a failed command means the connection must be made again (it broke, timed out, or the
/// server is no longer a primary).
pub(crate) fn needs_new_connection(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
                | ErrorKind::Server(ServerErrorKind::BusyLoading)
        )
}

/// What the engine URL says about where the primary is.
#[derive(Debug, Clone)]
pub enum Target {
    /// `redis://` or `rediss://`: one server.
    Direct(String),
    /// `redis+sentinel://` or `rediss+sentinel://`: ask the sentinels which server is the primary.
    Sentinel(SentinelTarget),
    /// `redis+cluster://` or `rediss+cluster://`: a Redis Cluster, found through these seed nodes.
    Cluster(ClusterTarget),
}

#[derive(Debug, Clone)]
pub struct ClusterTarget {
    /// One `redis://` (or `rediss://`) URL per seed node, with the URL's credentials and options.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SentinelTarget {
    /// `host:port` of each sentinel, asked in this order.
    pub sentinels: Vec<String>,
    pub master: String,
    /// `redis` or `rediss`, for the primary (sentinels are spoken to the same way).
    pub scheme: &'static str,
    /// `user:password@` or empty, for the primary.
    pub userinfo: String,
    pub db: u32,
    /// The URL's query string (with its `?`), for the primary; `sentinel_password` taken out.
    pub query: String,
    pub sentinel_password: Option<String>,
}

impl Target {
    /// Parses an engine URL: `redis://…`, `rediss://…`,
    /// `redis+sentinel://[user:password@]host1:26379,host2:26379/<master>[/<db>][?options]`,
    /// `redis+cluster://[user:password@]host1:7000,host2:7001[/][?options]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or("engine URL needs a scheme")?;
        let scheme = match scheme {
            "redis" | "rediss" => return Ok(Self::Direct(url.to_owned())),
            "redis+sentinel" => "redis",
            "rediss+sentinel" => "rediss",
            "redis+cluster" => return ClusterTarget::parse("redis", rest).map(Self::Cluster),
            "rediss+cluster" => return ClusterTarget::parse("rediss", rest).map(Self::Cluster),
            other => return Err(format!("unknown Redis URL scheme {other:?}")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, query),
            None => (rest, ""),
        };
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
            None => (String::new(), rest),
        };
        let mut parts = rest.split('/');
        let hosts = parts.next().unwrap_or_default();
        let master = parts.next().filter(|m| !m.is_empty()).ok_or("a Sentinel URL names its master: …/<master>")?;
        let db = match parts.next().filter(|d| !d.is_empty()) {
            Some(db) => db.parse().map_err(|_| format!("database {db:?} is not a number"))?,
            None => 0,
        };
        if parts.next().is_some_and(|extra| !extra.is_empty()) {
            return Err("a Sentinel URL is …/<master>/<db>, nothing after".into());
        }
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| if h.contains(':') { h.to_owned() } else { format!("{h}:26379") })
            .collect();
        if sentinels.is_empty() {
            return Err("a Sentinel URL lists at least one sentinel".into());
        }
        let mut sentinel_password = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| match pair.strip_prefix("sentinel_password=") {
                Some(password) => {
                    sentinel_password = Some(password.to_owned());
                    false
                }
                None => true,
            })
            .collect();
        let query = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
        Ok(Self::Sentinel(SentinelTarget {
            sentinels,
            master: master.to_owned(),
            scheme,
            userinfo,
            db,
            query,
            sentinel_password,
        }))
    }

    /// A URL for checking the shape of the connection settings without connecting.
    pub fn sample_url(&self) -> String {
        match self {
            Self::Direct(url) => url.clone(),
            Self::Sentinel(s) => s.primary_url(s.sentinels.first().map_or("localhost:6379", String::as_str)),
            Self::Cluster(c) => c.nodes.first().cloned().unwrap_or_default(),
        }
    }
}

impl ClusterTarget {
    /// `rest` is what follows `redis+cluster://`.
    fn parse(scheme: &str, rest: &str) -> Result<Self, String> {
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, format!("?{query}")),
            None => (rest, String::new()),
        };
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(path, "" | "0") {
            return Err("a Redis Cluster has only database 0: redis+cluster://host1:7000,host2:7001[/0]".into());
        }
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| if h.contains(':') { h.to_owned() } else { format!("{h}:6379") })
            .map(|h| format!("{scheme}://{userinfo}{h}/{query}"))
            .collect();
        if nodes.is_empty() {
            return Err("a Redis Cluster URL lists at least one node: redis+cluster://host1:7000,host2:7001".into());
        }
        Ok(Self { nodes })
    }
}

impl SentinelTarget {
    fn primary_url(&self, address: &str) -> String {
        format!("{}://{}{address}/{}{}", self.scheme, self.userinfo, self.db, self.query)
    }

    fn sentinel_url(&self, address: &str) -> String {
        let auth = self.sentinel_password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        format!("{}://{auth}{address}", self.scheme)
    }
}

/// The server a connection talks to, as it described itself when the connection was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `master_replid`: one unbroken history of writes.
    pub replid: Arc<str>,
    pub run_id: String,
    pub address: String,
}

/// A command connection: to one server, or to a Redis Cluster (routed by key slot, following
/// redirections and topology changes itself).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The replication ID passed to the scripts when the node cannot know which server runs them (Redis
/// Cluster): the script reads the ID of the server it runs on itself (`scripts.rs`).
pub const REPLID_OF_RUNNING_SERVER: &str = "*";

/// The command connection to the current primary, with the identity read on it.
#[derive(Clone)]
pub struct Live {
    pub conn: Conn,
    pub identity: Arc<Identity>,
    generation: u64,
}

impl Live {
    /// Whether both are the same connection (not merely to the same server).
    pub fn same_connection(&self, other: &Live) -> bool {
        self.generation == other.generation
    }
}

/// Builds clients with the configured TLS settings: for one server, or for a Redis Cluster.
pub struct Connector {
    /// PEM of the certificate authority for `rediss://` (default: the system's trust store).
    root_cert: Option<Vec<u8>>,
}

impl Connector {
    pub fn new(root_cert: Option<Vec<u8>>) -> Self {
        Self { root_cert }
    }

    /// A client for the server at `url`.
    pub fn client(&self, url: &str) -> Result<redis::Client, EngineError> {
        let protocol = |e: redis::RedisError| EngineError::Protocol(e.to_string());
        match &self.root_cert {
            Some(root_cert) if url.starts_with("rediss://") => {
                let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert.clone()) };
                redis::Client::build_with_tls(url, certificates).map_err(protocol)
            }
            _ => redis::Client::open(url).map_err(protocol),
        }
    }

    /// A client for the cluster `target` seeds; with `pushes`, over RESP3 with pub/sub messages sent
    /// there.
    pub fn cluster(
        &self,
        target: &ClusterTarget,
        timeout: Duration,
        pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<redis::cluster::ClusterClient, EngineError> {
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(target.nodes.clone()).connection_timeout(timeout).retries(3);
        if let Some(root_cert) = &self.root_cert {
            builder = builder.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert.clone()) });
        }
        if let Some(pushes) = pushes {
            builder = builder.use_protocol(redis::ProtocolVersion::RESP3).push_sender(pushes);
        }
        builder.build().map_err(|e| EngineError::Protocol(e.to_string()))
    }
}

/// The command connection, made again when it breaks.
pub struct Commands {
    target: Target,
    connector: Connector,
    timeout: Duration,
    current: Mutex<Option<Live>>,
    connecting: tokio::sync::Mutex<()>,
    /// The last identity seen, kept across reconnects to tell a new primary from the same one.
    last_identity: Mutex<Option<Arc<Identity>>>,
    /// When a connect attempt last failed: callers fail fast for a moment instead of queueing up.
    last_failure: Mutex<Option<Instant>>,
    generation: AtomicU64,
    /// Times the primary's identity changed (a restart or a failover).
    pub(crate) identity_changes: AtomicU64,
}

/// How long callers fail fast after a failed connect attempt.
const RETRY_AFTER: Duration = Duration::from_millis(200);

impl Commands {
    pub fn new(target: Target, connector: Connector, timeout: Duration) -> Self {
        Self {
            target,
            connector,
            timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_identity: Mutex::new(None),
            last_failure: Mutex::new(None),
            generation: AtomicU64::new(0),
            identity_changes: AtomicU64::new(0),
        }
    }

    /// The live connection, connecting first when there is none. Callers that arrive while a connect
    /// attempt runs share its outcome; right after a failed attempt they fail at once.
    pub async fn get(&self) -> Result<Live, EngineError> {
        if let Some(live) = lock(&self.current).clone() {
            return Ok(live);
        }
        let arrived = Instant::now();
        if lock(&self.last_failure).is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return Err(EngineError::Unavailable("redis is reconnecting".into()));
        }
        let Ok(_connecting) = tokio::time::timeout(self.timeout * 3, self.connecting.lock()).await else {
            return Err(EngineError::Unavailable("redis is reconnecting".into()));
        };
        if let Some(live) = lock(&self.current).clone() {
            return Ok(live);
        }
        if lock(&self.last_failure).is_some_and(|at| at > arrived) {
            return Err(EngineError::Unavailable("redis is reconnecting".into()));
        }
        match self.connect().await {
            Ok(live) => {
                *lock(&self.last_failure) = None;
                *lock(&self.current) = Some(live.clone());
                Ok(live)
            }
            Err(error) => {
                *lock(&self.last_failure) = Some(Instant::now());
                Err(error)
            }
        }
    }

    /// Whether a command connection is up.
    pub fn is_connected(&self) -> bool {
        lock(&self.current).is_some()
    }

    /// Waits until a connection is made (at start-up), up to `deadline`.
    pub async fn wait_connected(&self, deadline: tokio::time::Instant) -> Result<Live, EngineError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.get().await {
                Ok(live) => return Ok(live),
                Err(error) if tokio::time::Instant::now() + delay > deadline => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "redis not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// The connection of `live` failed in a way that may mean it is dead or talks to a replica now:
    /// the next caller makes a new one (and reads the identity anew).
    pub fn broken(&self, live: &Live) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| c.generation == live.generation) {
            *current = None;
        }
    }

    /// Runs `call` on `live`'s connection, bounded by the command timeout; a failure that means the
    /// connection is unusable makes the next caller connect anew.
    pub async fn on<T>(
        &self,
        live: &Live,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if needs_new_connection(&error) {
                    self.broken(live);
                }
                Err(unavailable(error))
            }
            Err(_) => {
                self.broken(live);
                Err(EngineError::Timeout)
            }
        }
    }

    /// `call` (on a connection of its own, such as the pub/sub one), bounded by the command timeout.
    pub async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(EngineError::Timeout),
        }
    }

    /// The command timeout every call is bounded by.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Checks that the current connection still talks to the primary it was made to (a server turned
    /// into a replica and back keeps connections open but starts a new history). Drops it if not.
    pub async fn verify(&self) {
        let Some(live) = lock(&self.current).clone() else { return };
        // In a cluster every script reads the identity of the server it runs on itself.
        let Conn::Single(mut conn) = live.conn.clone() else { return };
        match tokio::time::timeout(self.timeout, describe(&mut conn)).await {
            Ok(Ok((role, identity))) if role == "master" && identity.replid == live.identity.replid => {}
            Ok(Ok((role, identity))) => {
                tracing::warn!(role, old_replid = %live.identity.replid, new_replid = %identity.replid,
                    address = %live.identity.address, "redis server changed role or history; reconnecting");
                self.broken(&live);
            }
            Ok(Err(_)) | Err(_) => self.broken(&live),
        }
    }

    /// A client for the current primary (for the pub/sub connection).
    pub async fn primary_client(&self) -> Result<(redis::Client, String), EngineError> {
        match &self.target {
            Target::Direct(url) => {
                let client = self.connector.client(url)?;
                let address = client.get_connection_info().addr().to_string();
                Ok((client, address))
            }
            Target::Sentinel(sentinel) => {
                let address = self.ask_sentinels(sentinel).await?;
                Ok((self.connector.client(&sentinel.primary_url(&address))?, address))
            }
            Target::Cluster(_) => Err(EngineError::Protocol("a Redis Cluster has no single primary".into())),
        }
    }

    /// The cluster this connects to, when it is one.
    pub fn cluster(&self) -> Option<&ClusterTarget> {
        match &self.target {
            Target::Cluster(cluster) => Some(cluster),
            _ => None,
        }
    }

    /// Builds clients with the configured TLS settings.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// A connection to the whole cluster: the scripts read each server's identity themselves.
    async fn connect_cluster(&self, target: &ClusterTarget) -> Result<Live, EngineError> {
        let client = self.connector.cluster(target, self.timeout, None)?;
        let conn = tokio::time::timeout(self.timeout * 2, client.get_async_connection())
            .await
            .map_err(|_| EngineError::Timeout)?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let identity = Arc::new(Identity {
            replid: Arc::from(REPLID_OF_RUNNING_SERVER),
            run_id: String::new(),
            address: target.nodes.join(","),
        });
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Live { conn: Conn::Cluster(conn), identity, generation })
    }

    async fn connect(&self) -> Result<Live, EngineError> {
        if let Target::Cluster(target) = &self.target {
            return self.connect_cluster(target).await;
        }
        let (client, address) = self.primary_client().await?;
        // Every call is bounded by the engine itself (the command timeout, or a `WAIT`'s own, longer one),
        // so the connection sets no response timeout of its own.
        let config =
            redis::AsyncConnectionConfig::new().set_connection_timeout(Some(self.timeout)).set_response_timeout(None);
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        let mut conn = tokio::time::timeout(self.timeout * 2, connect)
            .await
            .map_err(|_| EngineError::Timeout)?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let (role, mut identity) = tokio::time::timeout(self.timeout, describe(&mut conn))
            .await
            .map_err(|_| EngineError::Timeout)?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        if role == "loading" {
            return Err(EngineError::Unavailable(format!("redis at {address} is still loading its data")));
        }
        if role != "master" {
            return Err(EngineError::Unavailable(format!("redis at {address} is a {role}, not the primary")));
        }
        // Without it no restart or failover could be told apart: refuse rather than never fence.
        if identity.replid.is_empty() {
            return Err(EngineError::Protocol(format!(
                "redis at {address} reports no master_replid (INFO replication)"
            )));
        }
        identity.address = address;
        let identity = Arc::new(identity);
        let previous = lock(&self.last_identity).replace(identity.clone());
        if let Some(previous) = previous.filter(|p| p.replid != identity.replid) {
            self.identity_changes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                old_address = %previous.address, new_address = %identity.address,
                old_run_id = %previous.run_id, new_run_id = %identity.run_id,
                old_replid = %previous.replid, new_replid = %identity.replid,
                "redis primary has a new history of writes (restart or failover): its data may have rolled \
                 back; channels get a new epoch before their next publication"
            );
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Live { conn: Conn::Single(conn), identity, generation })
    }

    async fn ask_sentinels(&self, target: &SentinelTarget) -> Result<String, EngineError> {
        let mut last_error = EngineError::Unavailable("no sentinel answered".into());
        for sentinel in &target.sentinels {
            match self.ask_sentinel(target, sentinel).await {
                Ok(Some(address)) => return Ok(address),
                Ok(None) => {
                    last_error = EngineError::Unavailable(format!(
                        "sentinel {sentinel} knows no primary named {:?}",
                        target.master
                    ))
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    async fn ask_sentinel(&self, target: &SentinelTarget, sentinel: &str) -> Result<Option<String>, EngineError> {
        let client = self.connector.client(&target.sentinel_url(sentinel))?;
        let ask = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&target.master)
                .query_async::<Option<(String, String)>>(&mut conn)
                .await
        };
        let answer = tokio::time::timeout(self.timeout, ask)
            .await
            .map_err(|_| EngineError::Timeout)?
            .map_err(|e| EngineError::Unavailable(format!("sentinel {sentinel}: {e}")))?;
        Ok(answer
            .map(|(host, port)| if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }))
    }
}

/// The server's role and identity, from `INFO`.
async fn describe(conn: &mut MultiplexedConnection) -> redis::RedisResult<(String, Identity)> {
    let info: String = redis::cmd("INFO").arg("server").arg("replication").arg("persistence").query_async(conn).await?;
    let field = |name: &str| {
        info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_owned())
    };
    // A server still loading its data answers INFO and PUBLISH but refuses scripts: not usable yet.
    let loading = field("loading").is_some_and(|l| l != "0");
    let role = if loading { "loading".to_owned() } else { field("role").unwrap_or_default() };
    let identity = Identity {
        replid: Arc::from(field("master_replid").unwrap_or_default()),
        run_id: field("run_id").unwrap_or_default(),
        address: String::new(),
    };
    Ok((role, identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let Ok(Target::Sentinel(s)) = Target::parse("redis+sentinel://:pw@h1:26379,h2/mymaster/2?protocol=resp3")
        else {
            panic!("a sentinel URL")
        };
        assert_eq!(s.sentinels, ["h1:26379", "h2:26379"]);
        assert_eq!(s.master, "mymaster");
        assert_eq!(s.primary_url("10.0.0.1:6379"), "redis://:pw@10.0.0.1:6379/2?protocol=resp3");
        let Ok(Target::Sentinel(s)) = Target::parse("rediss+sentinel://a:1/m?sentinel_password=x") else {
            panic!("a sentinel URL")
        };
        assert_eq!((s.db, s.query.as_str(), s.sentinel_password.as_deref()), (0, "", Some("x")));
        assert_eq!(s.sentinel_url("a:1"), "rediss://:x@a:1");
        assert!(matches!(Target::parse("redis://localhost:6379/0"), Ok(Target::Direct(_))));
        let Ok(Target::Cluster(c)) = Target::parse("rediss+cluster://u:pw@h1:7000,h2/?protocol=resp3") else {
            panic!("a cluster URL")
        };
        assert_eq!(c.nodes, ["rediss://u:pw@h1:7000/?protocol=resp3", "rediss://u:pw@h2:6379/?protocol=resp3"]);
        assert!(matches!(Target::parse("redis+cluster://h1:7000/0"), Ok(Target::Cluster(_))));
        for bad in ["redis+cluster://", "redis+cluster://h1:7000/2", "redis+cluster://,/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        for bad in
            ["redis+sentinel://h1", "redis+sentinel://h1/", "redis+sentinel:///m", "redis+sentinel://h/m/x", "foo://x"]
        {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}

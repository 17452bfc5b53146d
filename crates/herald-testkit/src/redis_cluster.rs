//! A Redis Cluster of the caller's own: `redis-server --cluster-enabled yes` processes on free loopback
//! ports, joined with `redis-cli --cluster create`, with slots moved and primaries failed over on
//! request. Each server keeps its cluster state (`nodes.conf`) in its own folder, so a restarted server
//! rejoins as the same node (with no data).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{try_free_port, wait_until};
use crate::redis::RedisServer;

/// How long the cluster gets to agree on its slots after a change.
const SETTLE_TIME: Duration = Duration::from_secs(30);
/// A primary silent for this long (milliseconds) is failed over by its replicas.
const NODE_TIMEOUT: &str = "1000";

/// A Redis Cluster stopped by PID on drop. Servers `0..primaries` start as primaries, each followed by
/// its replicas in the order `redis-cli` assigns them.
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
    /// Servers stopped with SIGSTOP: alive, connections open, answering nothing.
    paused: Vec<usize>,
    /// Every server's `requirepass` (and `masterauth`), when the cluster has one.
    password: Option<String>,
    /// The certificates of a cluster that speaks only TLS (`ca.crt` signs every server's).
    tls_dir: Option<std::path::PathBuf>,
}

impl RedisCluster {
    /// `primaries` shards, each with `replicas` (with fewer than 3 primaries, which `redis-cli --cluster
    /// create` refuses, the slots are assigned directly and there are no replicas).
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        Self::try_start(primaries, replicas).expect("redis-server and redis-cli must be installed (scripts/test)")
    }

    pub fn try_start(primaries: usize, replicas: usize) -> anyhow::Result<RedisCluster> {
        Self::try_start_with(primaries, replicas, None)
    }

    /// As [`RedisCluster::try_start`], every server requiring `password` (clients and replicas alike).
    pub fn try_start_with(primaries: usize, replicas: usize, password: Option<&str>) -> anyhow::Result<RedisCluster> {
        Self::start_servers(primaries, replicas, password, None)
    }

    /// A cluster of at least 3 primaries that speaks only TLS, to clients and between its servers (the
    /// authority is [`RedisCluster::tls_ca`]).
    pub fn try_start_tls(primaries: usize, replicas: usize) -> anyhow::Result<RedisCluster> {
        let dir = crate::process::scratch_dir("herald-cluster-tls")?;
        crate::redis::make_certificates(&dir)?;
        Self::start_servers(primaries.max(3), replicas, None, Some(dir))
    }

    fn start_servers(
        primaries: usize,
        replicas: usize,
        password: Option<&str>,
        tls_dir: Option<std::path::PathBuf>,
    ) -> anyhow::Result<RedisCluster> {
        let count = primaries * (1 + replicas);
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            // The cluster bus listens on the port plus 10000: both must be free.
            let port = cluster_port()?;
            let args = server_args(password);
            servers.push(match &tls_dir {
                Some(dir) => RedisServer::try_start_tls_on(port, &args, dir)?,
                None => RedisServer::try_start_on(port, &args, false)?,
            });
        }
        if primaries < 3 {
            if replicas > 0 {
                bail!("a cluster of fewer than 3 primaries is made without replicas here");
            }
            let cluster =
                RedisCluster { servers, paused: Vec::new(), password: password.map(str::to_owned), tls_dir: None };
            cluster.assign_slots()?;
            cluster.wait_settled()?;
            return Ok(cluster);
        }
        let addresses: Vec<String> = servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let mut create = Command::new("redis-cli");
        if let Some(password) = password {
            create.args(["-a", password, "--no-auth-warning"]);
        }
        if let Some(dir) = &tls_dir {
            create.arg("--tls").arg("--cacert").arg(dir.join("ca.crt"));
        }
        let output = create
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&output.stdout));
        }
        let cluster = RedisCluster { servers, paused: Vec::new(), password: password.map(str::to_owned), tls_dir };
        cluster.wait_settled()?;
        Ok(cluster)
    }

    /// Splits the slots evenly over the servers (all primaries) and introduces them to each other.
    fn assign_slots(&self) -> anyhow::Result<()> {
        let count = self.servers.len() as u32;
        for (i, server) in self.servers.iter().enumerate() {
            let (low, high) = (16384 * i as u32 / count, 16384 * (i as u32 + 1) / count - 1);
            server.query::<String>(&["CLUSTER", "ADDSLOTSRANGE", &low.to_string(), &high.to_string()])?;
            // Distinct epochs, so the servers agree on the slots at once.
            server.query::<String>(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()])?;
            if i > 0 {
                let port = self.servers[0].port.to_string();
                server.query::<String>(&["CLUSTER", "MEET", "127.0.0.1", &port])?;
            }
        }
        Ok(())
    }

    /// `redis+cluster://[:<password>@]127.0.0.1:<p1>,127.0.0.1:<p2>,…` (every server as a seed).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let auth = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        let scheme = if self.tls_dir.is_some() { "rediss+cluster" } else { "redis+cluster" };
        format!("{scheme}://{auth}{}", hosts.join(","))
    }

    /// The certificate authority of a TLS cluster.
    pub fn tls_ca(&self) -> Option<std::path::PathBuf> {
        self.tls_dir.as_ref().map(|dir| dir.join("ca.crt"))
    }

    pub fn server(&self, i: usize) -> &RedisServer {
        &self.servers[i]
    }

    /// Indices of the servers that are primaries now (running ones only).
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|i| {
                self.servers[*i].pid().is_some() && self.servers[*i].replication("role").as_deref() == Some("master")
            })
            .collect()
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, asked of any running server).
    pub fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let server = self.running().context("no server runs")?;
        let slot: i64 = server.query(&["CLUSTER", "KEYSLOT", key])?;
        Ok(slot as u16)
    }

    /// The index of the primary serving `slot`, as the running servers see it.
    pub fn owner_of(&self, slot: u16) -> anyhow::Result<usize> {
        let server = self.running().context("no server runs")?;
        let nodes: String = server.query(&["CLUSTER", "NODES"])?;
        let port = owner_in_nodes(&nodes, slot).with_context(|| format!("no primary serves slot {slot}"))?;
        self.servers.iter().position(|s| s.port == port).with_context(|| format!("port {port} is not ours"))
    }

    /// The node ID of server `i`.
    pub fn node_id(&self, i: usize) -> anyhow::Result<String> {
        self.servers[i].query(&["CLUSTER", "MYID"])
    }

    /// Moves `slot` with its keys from its current primary to primary `to`, the way `redis-cli
    /// --cluster reshard` does: importing/migrating marks, `MIGRATE` in batches, then the new owner
    /// announced to every primary.
    pub fn migrate_slot(&self, slot: u16, to: usize) -> anyhow::Result<()> {
        let from = self.owner_of(slot)?;
        if from == to {
            return Ok(());
        }
        let slot_text = slot.to_string();
        let from_id = self.node_id(from)?;
        let to_id = self.node_id(to)?;
        self.servers[to].query::<String>(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id])?;
        self.servers[from].query::<String>(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id])?;
        let to_port = self.servers[to].port.to_string();
        loop {
            let keys: Vec<String> = self.servers[from].query(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])?;
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "REPLACE"];
            if let Some(password) = &self.password {
                args.extend(["AUTH", password.as_str()]);
            }
            args.push("KEYS");
            args.extend(keys.iter().map(String::as_str));
            self.servers[from].query::<String>(&args)?;
        }
        for i in self.primaries() {
            self.servers[i].query::<String>(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id])?;
        }
        self.wait_settled()
    }

    /// Starts one more server, introduces it to the cluster as a primary without slots, and returns its
    /// index (move slots to it with [`RedisCluster::migrate_slot`]).
    pub fn add_primary(&mut self) -> anyhow::Result<usize> {
        let port = cluster_port()?;
        let server = RedisServer::try_start_on(port, &server_args(self.password.as_deref()), false)?;
        let seed = self.running().context("no server runs")?.port.to_string();
        server.query::<String>(&["CLUSTER", "MEET", "127.0.0.1", &seed])?;
        self.servers.push(server);
        let index = self.servers.len() - 1;
        let id = self.node_id(index)?;
        // Known to every server, and knowing every slot's owner itself.
        wait_until("the new server did not join the cluster", SETTLE_TIME, || {
            self.servers
                .iter()
                .filter(|s| s.pid().is_some())
                .all(|s| s.query::<String>(&["CLUSTER", "NODES"]).is_ok_and(|nodes| nodes.contains(&id)))
                && self.settled()
        })?;
        Ok(index)
    }

    /// Stops server `i` with SIGSTOP: its connections stay open and silent (a hung server, or a network
    /// that drops everything), and the cluster fails it over once the node timeout passes.
    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].signal("STOP")?;
        self.paused.push(i);
        Ok(())
    }

    /// Wakes a server [`RedisCluster::pause`]d.
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.paused.retain(|p| *p != i);
        self.servers[i].signal("CONT")
    }

    /// Kills server `i` (SIGKILL, like a crash).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Starts server `i` again on its port (with no data; it keeps its cluster identity).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].try_restart()
    }

    /// Waits until every running server says the cluster is ok and they agree on which primary
    /// serves every slot, each of them a running server (after a kill: until a replica took over), and
    /// every replica follows its primary.
    pub fn wait_settled(&self) -> anyhow::Result<()> {
        wait_until("the redis cluster did not settle", SETTLE_TIME, || self.settled())
    }

    fn settled(&self) -> bool {
        let answering =
            || self.servers.iter().enumerate().filter(|(i, s)| s.pid().is_some() && !self.paused.contains(i));
        let running: Vec<u16> = answering().map(|(_, s)| s.port).collect();
        let mut views = Vec::new();
        for (_, server) in answering() {
            let Some(state) = server.info_cluster("cluster_state") else { return false };
            if state != "ok" {
                return false;
            }
            // A replica counts once it follows its primary.
            if server.replication("role").as_deref() == Some("slave")
                && server.replication("master_link_status").as_deref() != Some("up")
            {
                return false;
            }
            let Ok(nodes) = server.query::<String>(&["CLUSTER", "NODES"]) else { return false };
            let owners = slot_owners(&nodes);
            if owners.iter().any(|(_, port)| !running.contains(port)) {
                return false;
            }
            views.push(owners);
        }
        views.windows(2).all(|pair| pair[0] == pair[1]) && views.first().is_some_and(|v| v.len() == 16384)
    }

    fn running(&self) -> Option<&RedisServer> {
        self.servers.iter().enumerate().find(|(i, s)| s.pid().is_some() && !self.paused.contains(i)).map(|(_, s)| s)
    }
}

/// The arguments of every server of a cluster.
fn server_args(password: Option<&str>) -> Vec<&str> {
    let mut args = vec![
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        NODE_TIMEOUT,
        // A replica that lost its primary long ago may still take over (tests kill primaries).
        "--cluster-replica-validity-factor",
        "0",
        "--appendonly",
        "no",
    ];
    if let Some(password) = password {
        args.extend(["--requirepass", password, "--masterauth", password]);
    }
    args
}

/// Picks a free port whose cluster bus port (plus 10000) is free too.
fn cluster_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = try_free_port()?;
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no free port pair for a cluster node")
}

/// Slot -> port of the primary serving it, from `CLUSTER NODES` (connected primaries only).
fn slot_owners(nodes: &str) -> Vec<(u16, u16)> {
    let mut owners = Vec::with_capacity(16384);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let Some(port) = fields[1].split('@').next().and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok()) else {
            continue;
        };
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue;
            }
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>()) else { continue };
            owners.extend((low..=high).map(|slot| (slot, port)));
        }
    }
    owners.sort_unstable();
    owners
}

fn owner_in_nodes(nodes: &str, slot: u16) -> Option<u16> {
    slot_owners(nodes).into_iter().find(|(s, _)| *s == slot).map(|(_, port)| port)
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.servers.clear();
        if let Some(dir) = self.tls_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

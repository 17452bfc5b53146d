//! A backend-for-frontend that embeds Herald (see README.md beside this crate): replicas of one axum
//! app, each with Herald's router nested at `/herald`, behind a round-robin TCP balancer; a simulated
//! external system that calls a webhook on a random replica; jobs kept in SQLite.
//!
//! [`Demo::start`] starts all of it in this process (the `demo` command and the tests use it). Each
//! replica has its own listener, its own Herald node and its own database connection: the replicas
//! share nothing but what separate processes would share, the SQLite file and Redis (or, naive, nothing).

pub mod balancer;
pub mod db;
pub mod external;
pub mod replica;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpListener;

pub use db::Job;
pub use replica::JOB_FINISHED;

/// What coordinates the replicas' Herald nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordination {
    /// Herald's Redis engine at this URL: a publication on any replica reaches a stream on any other.
    Redis(String),
    /// Each replica on Herald's embedded in-memory engine: a publication only reaches the streams of the
    /// replica that made it.
    Naive,
}

/// How to start the demo.
#[derive(Debug, Clone)]
pub struct Options {
    pub coordination: Coordination,
    /// The SQLite file (created when missing).
    pub database: PathBuf,
    /// Where the balancer listens (port 0: any free port).
    pub listen: SocketAddr,
    pub replicas: usize,
    /// How long the external system works on a job.
    pub work: Range<Duration>,
}

impl Options {
    pub fn new(coordination: Coordination, database: PathBuf) -> Options {
        Options {
            coordination,
            database,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            replicas: 3,
            work: Duration::from_secs(2)..Duration::from_secs(5),
        }
    }
}

/// Random letters and digits.
pub fn random_id(len: usize) -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(len).map(char::from).collect()
}

/// Everything running: the replicas, the balancer in front of them, the external system.
pub struct Demo {
    pub balancer: balancer::Balancer,
    pub replicas: Vec<replica::Replica>,
    pub external: external::External,
}

impl Demo {
    /// Starts `options.replicas` replicas, the balancer and the external system.
    pub async fn start(options: Options) -> anyhow::Result<Demo> {
        anyhow::ensure!(options.replicas > 0, "at least one replica");
        // The schema is made once, before the replicas open their connections.
        drop(db::open(&options.database)?);
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let balancer_listener = TcpListener::bind(options.listen).await?;
        let external_listener = TcpListener::bind(loopback).await?;
        let mut replica_listeners = Vec::new();
        for _ in 0..options.replicas {
            replica_listeners.push(TcpListener::bind(loopback).await?);
        }
        let replica_addrs =
            replica_listeners.iter().map(TcpListener::local_addr).collect::<Result<Vec<SocketAddr>, _>>()?;
        let external = external::start(external_listener, replica_addrs.clone(), options.work.clone())?;
        let engine = match &options.coordination {
            Coordination::Redis(url) => url.clone(),
            Coordination::Naive => "memory".to_owned(),
        };
        let mut replicas = Vec::new();
        for (i, listener) in replica_listeners.into_iter().enumerate() {
            let config = replica::ReplicaConfig {
                name: format!("replica-{}", i + 1),
                engine: engine.clone(),
                database: options.database.clone(),
                external_url: format!("http://{}", external.addr),
            };
            replicas.push(replica::start(config, listener).await?);
        }
        let balancer = balancer::start(balancer_listener, replica_addrs)?;
        Ok(Demo { balancer, replicas, external })
    }

    /// The page's URL, through the balancer.
    pub fn url(&self) -> String {
        format!("http://{}/", self.balancer.addr)
    }

    /// Callbacks a replica acknowledged so far.
    pub fn callbacks_acknowledged(&self) -> usize {
        self.external.counters.acknowledged.load(Ordering::SeqCst)
    }

    /// Stops the balancer, the external system and every replica.
    pub async fn stop(self) {
        self.balancer.stop();
        self.external.stop();
        let mut stopping = tokio::task::JoinSet::new();
        for replica in self.replicas {
            stopping.spawn(replica.stop());
        }
        while stopping.join_next().await.is_some() {}
    }
}

//! The NATS engine on a JetStream cluster of three servers of the test's own, with a replicated (R3)
//! stream: a server killed while three Herald nodes publish and subscribe, and the whole NATS cluster
//! restarted with its storage kept. Every publication answered 200 reaches each client or is covered
//! by a reset; with storage kept, clients continue without one. Also the ways a node proves itself to
//! NATS (token, user and password, NKey) and `tls://`, each against a server of the test's own.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use herald_server::Config;
use herald_testkit::{NatsCluster, NatsServer, make_certificates, scratch_dir};

use crate::harness::{Server, Sse, TIMEOUT};
use crate::rollback::Ledger;

async fn nodes(cluster: &NatsCluster, count: usize) -> Vec<Server> {
    let prefix = format!("t{:08x}", rand::random::<u32>());
    let mut nodes = Vec::new();
    for _ in 0..count {
        let (url, prefix) = (cluster.url(), prefix.clone());
        nodes.push(
            Server::with(move |config| {
                config.engine = url;
                config.nats.prefix = prefix;
                config.nats.replicas = 3;
                config.nats.probe_interval_ms = 100;
                config.nats.probe_timeout_ms = 1000;
                config.nats.node_ttl_secs = 3;
                config.nats.command_timeout_ms = 2000;
            })
            .await,
        );
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_while_publishing_loses_nothing_silently() {
    let mut cluster = NatsCluster::start(3);
    let nodes = nodes(&cluster, 3).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        subscribers.push(Sse::open(node, "channel=job:1", None).await.0);
    }
    let mut acked = Vec::new();
    for i in 0..120u64 {
        if i == 40 {
            cluster.kill(0);
        }
        let node = &nodes[i as usize % nodes.len()];
        let (status, answer) = node.post("/v1/publish", json!({"channel": "job:1", "data": i})).await;
        match status {
            StatusCode::OK => acked.push((answer, json!(i))),
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("publish answered {other}: {answer}"),
        }
    }
    // One more after the cluster settled, so every client has something to wait for.
    let last = nodes[0].publish_eventually("job:1", json!("last")).await;
    acked.push((last.clone(), json!("last")));
    assert!(acked.len() > 80, "most publications went through: {}", acked.len());
    for sse in &mut subscribers {
        let mut ledger = Ledger::default();
        ledger.read_until(sse, &last).await;
        ledger.check(&acked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_nats_cluster_restarted_with_storage_kept_means_no_reset() {
    let mut cluster = NatsCluster::start(3);
    let nodes = nodes(&cluster, 2).await;
    let (mut live, _) = Sse::open(&nodes[0], "channel=doc:1", None).await;
    for i in 1..=3 {
        nodes[1].publish_eventually("doc:1", json!(i)).await;
    }
    live.expect_offsets("doc:1", 0, 3).await;
    let (away, _) = Sse::open(&nodes[1], "channel=doc:1", None).await;
    let cursor = away.last_id.clone();
    drop(away);
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    cluster.restart_all();
    nodes[1].publish_eventually("doc:1", json!(4)).await;
    // The connected client continues; the returning one replays what it missed; neither is reset.
    assert_eq!(live.expect_offsets("doc:1", 3, 1).await, vec![json!(4)]);
    // The stream and each bucket are Raft groups of their own that elect a leader after the restart; the
    // returning client's presence entry goes to one that may still be electing (two or three election
    // rounds on a loaded 2-core machine took over 20 s). A 503 meanwhile is an honest answer, which an
    // EventSource retries.
    let deadline = tokio::time::Instant::now() + TIMEOUT * 6;
    let mut back = loop {
        match Sse::connect(&nodes[0], "channel=doc:1", Some(&cursor)).await {
            Ok(sse) => break sse,
            Err((StatusCode::SERVICE_UNAVAILABLE, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(refused) => panic!("the returning client was refused: {refused:?}"),
        }
    };
    assert_eq!(back.next().await.0, "herald.connected");
    assert_eq!(back.expect_offsets("doc:1", 3, 1).await, vec![json!(4)]);
}

/// NATS restored from an older backup: the channel's position went backwards under clients that saw
/// more. The channel is fenced into a new epoch, connected and returning clients get a reset
/// `engine_rollback`, and no position is handed out twice with different contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restored_from_an_older_backup_fences_the_channel() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let node = Server::with(move |config| {
        config.engine = url;
        config.nats.probe_interval_ms = 100;
        config.nats.probe_timeout_ms = 1000;
    })
    .await;
    let (mut sse, _) = Sse::open(&node, "channel=acct:1", None).await;
    let mut acked = Vec::new();
    for i in 1..=5 {
        acked.push((node.publish_eventually("acct:1", json!(i)).await, json!(i)));
    }
    let backup = backup(&mut nats);
    nats.restart();
    for i in 6..=8 {
        acked.push((node.publish_eventually("acct:1", json!(i)).await, json!(i)));
    }
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[7].0).await;
    restore(&mut nats, &backup);
    let last = node.publish_eventually("acct:1", json!("after")).await;
    acked.push((last.clone(), json!("after")));
    ledger.read_until(&mut sse, &last).await;
    ledger.check(&acked);
    assert!(ledger.resets("engine_rollback") >= 1, "the rollback is announced as such");
    assert_ne!(last["epoch"], acked[0].0["epoch"], "the channel moved to a new epoch");
}

/// Stops the server and copies its store aside (a backup an operator might restore).
pub fn backup(nats: &mut NatsServer) -> std::path::PathBuf {
    nats.stop();
    let copy = nats.store_dir().with_extension("backup");
    let _ = std::fs::remove_dir_all(&copy);
    copy_dir(&nats.store_dir(), &copy);
    copy
}

/// Stops the server, puts `backup` back as its store and starts it: what came after is gone.
pub fn restore(nats: &mut NatsServer, backup: &std::path::Path) {
    nats.stop();
    let _ = std::fs::remove_dir_all(nats.store_dir());
    copy_dir(backup, &nats.store_dir());
    let _ = std::fs::remove_dir_all(backup);
    nats.restart();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success(), "copying {} to {}", from.display(), to.display());
}

/// Two nodes on `url` (configured by `tweak` as well): a publication on one reaches a client of the other.
async fn delivers_through(url: &str, tweak: impl Fn(&mut Config), channel: &str) {
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(
            Server::with(|config| {
                config.engine = url.to_owned();
                config.nats.probe_interval_ms = 100;
                tweak(config);
            })
            .await,
        );
    }
    let (mut sse, _) = Sse::open(&nodes[0], &format!("channel={channel}"), None).await;
    nodes[1].publish(channel, json!("through NATS")).await;
    assert_eq!(sse.expect_offsets(channel, 0, 1).await, vec![json!("through NATS")]);
}

/// A node on `url` (configured by `tweak`) that NATS does not let in: its start fails promptly, with the
/// reason, instead of waiting out the start-up wait. Returns the reason.
async fn refused(url: &str, tweak: impl FnOnce(&mut Config)) -> String {
    let cli = herald_server::config::Cli { listen: Some("127.0.0.1:0".into()), ..Default::default() };
    let mut settings = herald_server::config::load(&cli, &[]).expect("configuration");
    settings.config.engine = url.to_owned();
    tweak(&mut settings.config);
    let started = tokio::time::timeout(TIMEOUT, herald_server::start(settings)).await.expect("refused promptly");
    started.err().expect("a node NATS does not let in must not start").to_string()
}

/// Nodes authenticate to NATS with a token or a user and password; without them they do not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_to_nats_with_a_token_or_a_user_and_password() {
    let token = NatsServer::try_start_with(&["--auth", "s3cret-token"]).expect("nats-server with a token");
    let users = NatsServer::try_start_with(&["--user", "herald", "--pass", "pa55"]).expect("nats-server with a user");
    let port = |url: String| url.trim_start_matches("nats://").to_owned();
    let (token_url, user_url) = (token.url(), format!("nats://herald:pa55@{}", port(users.url())));
    delivers_through(&token_url, |config| config.nats.token = Some("s3cret-token".into()), "auth:1").await;
    delivers_through(&user_url, |_| {}, "auth:2").await;
    // Without the token NATS refuses the node, which then does not start, at once: waiting cannot help.
    let error = refused(&token_url, |_| {}).await;
    assert!(error.contains("credentials"), "{error}");
}

/// Two nodes on a NATS that knows users only by their NKey (the server's config file names the public key,
/// the node holds the seed): the node signs the server's challenge and delivery works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_to_nats_with_an_nkey() {
    let user = nkeys::KeyPair::new_user();
    let dir = scratch_dir("herald-nkey").expect("scratch folder");
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key()))
        .expect("nats config");
    let seed = dir.join("user.nk");
    std::fs::write(&seed, user.seed().expect("seed")).expect("seed file");
    let nats = NatsServer::try_start_with(&["-c", &conf.display().to_string()]).expect("nats-server with an nkey user");
    delivers_through(&nats.url(), |config| config.nats.nkey_seed_file = Some(seed.clone()), "nkey:1").await;
    // Another user's seed is refused at once.
    std::fs::write(&seed, nkeys::KeyPair::new_user().seed().expect("seed")).expect("seed file");
    let error = refused(&nats.url(), |config| config.nats.nkey_seed_file = Some(seed)).await;
    assert!(error.contains("credentials"), "{error}");
}

/// `tls://` with the CA that signed the server's certificate: nodes verify NATS and deliver; a node that
/// does not trust that CA does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_to_nats_over_tls_with_tls_urls() {
    let dir = scratch_dir("herald-nats-tls").expect("scratch folder");
    make_certificates(&dir).expect("openssl makes the certificates (scripts/test installs it)");
    let (cert, key) = (dir.join("server.crt").display().to_string(), dir.join("server.key").display().to_string());
    let nats =
        NatsServer::try_start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key]).expect("nats-server with TLS");
    let url = nats.url().replace("nats://", "tls://");
    delivers_through(&url, |config| config.nats.tls_ca_file = Some(dir.join("ca.crt")), "secure:1").await;
    let error = refused(&url, |_| {}).await;
    assert!(error.contains("TLS"), "{error}");
}

/// Decentralised authentication: NATS in operator mode (an operator, an account with JetStream, both as
/// JWTs in the server's configuration), and the node holding a `.creds` file (the user's JWT, signed by
/// the account, and its NKey seed). The JWTs are made here with `nkeys`, as `nsc` would make them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_to_nats_with_a_credentials_file() {
    let (operator, account, user) =
        (nkeys::KeyPair::new_operator(), nkeys::KeyPair::new_account(), nkeys::KeyPair::new_user());
    let operator_jwt = jwt(&operator, &operator.public_key(), json!({"type": "operator", "version": 2}));
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt =
        jwt(&operator, &account.public_key(), json!({"type": "account", "version": 2, "limits": unlimited}));
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), json!({"type": "account", "version": 2}));
    let dir = scratch_dir("herald-creds").expect("scratch folder");
    let conf = dir.join("nats.conf");
    let server_conf = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {sys}: \"{system_jwt}\", {}: \"{account_jwt}\" }}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    std::fs::write(&conf, server_conf).expect("nats config");
    let creds = dir.join("node.creds");
    let seed = user.seed().expect("seed");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("creds file");
    let nats = NatsServer::try_start_with(&["-c", &conf.display().to_string()]).expect("nats-server in operator mode");
    delivers_through(&nats.url(), |config| config.nats.credentials_file = Some(creds.clone()), "creds:1").await;
}

/// A JWT as NATS reads it: `ed25519-nkey` signed by `issuer`, base64url without padding.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = json!({
        "jti": format!("{:032X}", rand::random::<u128>()), "iat": iat, "iss": issuer.public_key(),
        "name": "herald-test", "sub": subject, "nats": nats,
    });
    let payload = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(payload.as_bytes()).expect("sign");
    format!("{payload}.{}", b64(&signature))
}

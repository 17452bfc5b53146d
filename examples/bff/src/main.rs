//! `herald-example-bff demo [--naive] [--port N] [--redis URL]`: starts the whole example and prints
//! its URL (see README.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_example_bff::{Coordination, Demo, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str = "usage: herald-example-bff demo [--naive] [--port N] [--redis URL]

  demo            three replicas of the app, each embedding Herald on the Redis engine, behind a
                  round-robin balancer; starts its own redis-server (no persistence) on a free port
  --naive         each replica on Herald's in-memory engine instead: no coordination, updates go missing
  --port N        the balancer's port on 127.0.0.1 (default 8090; 0 picks a free one)
  --redis URL     use this Redis instead of starting one";

struct Args {
    naive: bool,
    port: u16,
    redis: Option<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    if args.next().as_deref() != Some("demo") {
        bail!("{USAGE}");
    }
    let mut parsed = Args { naive: false, port: 8090, redis: None };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--naive" => parsed.naive = true,
            "--port" => parsed.port = args.next().context("--port needs a number")?.parse().context("--port")?,
            "--redis" => parsed.redis = Some(args.next().context("--redis needs a URL")?),
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(parsed)
}

/// A `redis-server` of our own, killed (by PID, through its `Child`) on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").await.is_ok()
        && stream.read_exact(&mut answer).await.is_ok()
        && &answer == b"+PONG\r\n"
}

async fn start_redis(dir: &std::path::Path) -> anyhow::Result<OwnRedis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (is it installed? apt-get install redis-server)")?;
    let redis = OwnRedis { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers_ping(port).await {
        if Instant::now() > deadline {
            bail!("redis-server on port {port} did not answer PING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(redis)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let dir: PathBuf = std::env::temp_dir().join(format!("herald-example-bff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut own_redis = None;
    let coordination = match (args.naive, args.redis) {
        (true, _) => Coordination::Naive,
        (false, Some(url)) => Coordination::Redis(url),
        (false, None) => {
            let redis = start_redis(&dir).await?;
            let url = format!("redis://127.0.0.1:{}/0", redis.port);
            println!("redis-server (pid {}, no persistence) on {url}", redis.child.id());
            own_redis = Some(redis);
            Coordination::Redis(url)
        }
    };
    let mut options = Options::new(coordination.clone(), dir.join("jobs.db"));
    options.listen = SocketAddr::from(([127, 0, 0, 1], args.port));
    let demo = Demo::start(options).await?;
    for replica in &demo.replicas {
        println!("{} on http://{}", replica.name, replica.addr);
    }
    println!("external system on http://{}", demo.external.addr);
    println!("database {}", dir.join("jobs.db").display());
    match coordination {
        Coordination::Naive => println!("NAIVE: each replica's Herald runs on its own in-memory engine"),
        Coordination::Redis(url) => println!("replicas coordinate through Redis at {url}"),
    }
    println!("\nopen {}   (Ctrl-C stops everything)", demo.url());
    tokio::signal::ctrl_c().await?;
    demo.stop().await;
    drop(own_redis);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! The `herald` binary: parse configuration (exit 64 when it is bad, before binding anything), set up
//! logging, bind, print one machine-readable line with the bound address, serve until SIGTERM/SIGINT,
//! drain, exit. A second signal exits at once.

use std::process::ExitCode;

use clap::Parser;
use herald_server::{Cli, EXIT_BAD_CONFIG, Settings, config};
use tokio_util::sync::CancellationToken;

/// jemalloc with its background threads: memory freed after a connection storm or a burst of slow
/// clients goes back to the system within seconds instead of staying in per-thread arenas, as glibc's
/// allocator keeps it (BENCHMARKS.md, "Memory after churn"). Embedders choose their own allocator.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let settings = match config::load(&cli, &env) {
        Ok(settings) => settings,
        Err(problems) => {
            eprintln!("herald: the configuration is not valid:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let telemetry = match herald_server::telemetry::init(&settings) {
        Ok(telemetry) => telemetry,
        Err(problem) => {
            eprintln!("herald: the configuration is not valid:\n  - {problem}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    raise_open_file_limit(settings.config.limits.sockets());
    for name in &settings.ignored_env {
        tracing::warn!(variable = %name, "ignored: this HERALD_ environment variable names no configuration key");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if settings.config.worker_threads > 0 {
        runtime.worker_threads(settings.config.worker_threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(settings));
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    use anyhow::Context;
    let listen = settings.listen;
    let state = herald_server::start(settings).await.context("starting the engine")?;
    let socket = if listen.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .context("creating the listening socket")?;
    socket.set_reuseaddr(true).context("setting SO_REUSEADDR")?;
    socket.bind(listen).with_context(|| format!("binding {listen}"))?;
    // A deep backlog absorbs reconnect storms (tokio's default is 1024).
    let listener = socket.listen(4096).with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let config = state.config();
    if config.api_keys.is_empty() {
        tracing::warn!(%bound, "no API keys: anyone who can reach this address may publish");
    }
    if !state.auth().enabled() {
        tracing::warn!(%bound, "no client authentication: anyone who can reach this address may subscribe to any channel");
    }
    if config.insecure && !bound.ip().is_loopback() {
        tracing::warn!(%bound, "INSECURE: serving other machines without the authentication above (--insecure)");
    }
    // The one line tests and scripts read: the address actually bound (port 0 resolved).
    println!("{}", serde_json::json!({"listening": bound.to_string(), "node": state.hub().node_id()}));
    tracing::info!(%bound, node = state.hub().node_id(), "herald listening; open http://{bound}/");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    herald_server::run(state, listener, shutdown).await
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested; a second signal exits at once");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}

/// Descriptors a node needs besides its sockets: engine connections, log and key files, the runtime's.
const FILE_MARGIN: u64 = 64;

/// Every connection is a file descriptor, and many environments start processes with a soft limit of
/// 1,024 under a much higher hard one (some container runtimes, systemd's default). The soft limit is
/// raised to the hard one, as servers that hold many connections do; a limit still below the socket
/// cap is worth a warning, since the kernel then refuses connections before Herald's own cap does.
fn raise_open_file_limit(sockets: usize) {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < sockets as u64 + FILE_MARGIN => tracing::warn!(
            limit,
            max_sockets = sockets,
            "the open-file limit is below limits.max_sockets: accepting fails (EMFILE) before Herald's cap is reached"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    #[cfg(not(unix))]
    let _ = sockets;
}

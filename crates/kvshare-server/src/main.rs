//! `kvshared`: the kvshare cache node.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvshare_server::ServerConfig;
use kvshare_server::config::LogFormat;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::parse();
    let filter = EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("invalid --log-level {:?}", config.log_level))?;
    if config.log_format == LogFormat::Json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let drain = Duration::from_secs(config.drain_seconds);
    let node = kvshare_server::start(config)
        .await
        .context("starting kvshared")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing SIGHUP handler")?;
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = hup.recv() => {
                // SIGHUP: re-read the TLS files now (they are also polled every second).
                match node.reload_tls() {
                    Ok(true) => tracing::info!("SIGHUP: TLS files reloaded"),
                    Ok(false) => tracing::info!("SIGHUP: nothing to reload (TLS is off)"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS files do not load; keeping the running certificates"),
                }
            }
        }
    }
    tracing::info!("shutdown requested; draining in-flight requests");
    node.shutdown(drain).await.context("shutting down")?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

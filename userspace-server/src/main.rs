//! `sand`, the sanblk server.

use clap::Parser;
use tokio::sync::watch;

use sand::config::{Config, Flags};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let flags = Flags::parse();
    let outcome = Config::from_flags(flags).and_then(|config| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let (shutdown_sender, shutdown) = watch::channel(false);
            tokio::spawn(async move {
                if let Err(error) = sand::server::signal_shutdown(shutdown_sender).await {
                    log::error!("cannot install signal handlers: {error}");
                }
            });
            sand::server::run(config, shutdown).await
        })
    });
    if let Err(error) = outcome {
        log::error!("{error:#}");
        eprintln!("sand: {error:#}");
        std::process::exit(1);
    }
}

//! `roomcast`: serve a node, publish an event, mint a token. Wiring only:
//! configuration layering lives in `config.rs`, everything else in the
//! library crates.

mod cli;
mod config;
mod publish;
mod serve;

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let cli::Command::Serve(args) = &cli.command {
        if let Some(n) = args.worker_threads {
            anyhow::ensure!(n > 0, "--worker-threads must be at least 1");
            builder.worker_threads(n);
        }
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            cli::Command::Serve(args) => serve::run(*args).await,
            cli::Command::Publish(args) => publish::run(*args).await,
            cli::Command::Token(args) => cli::token(args),
        }
    })
}

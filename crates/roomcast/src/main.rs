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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            cli::Command::Serve(args) => serve::run(*args).await,
            cli::Command::Publish(args) => publish::run(args).await,
            cli::Command::Token(args) => cli::token(args),
        }
    })
}

//! `chorus`: run a node, mint tokens, drive a client, generate load.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "chorus", about = "Chorus live-audio cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Act as a client: create, join, comment, react, …
    Client(chorus_node::client::cli::ClientArgs),
    /// Generate load: many listeners and senders in one room.
    Loadgen(chorus_node::loadgen::LoadgenArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Client(args) => chorus_node::client::cli::run(args).await,
        Command::Loadgen(args) => chorus_node::loadgen::run(args).await,
    }
}
